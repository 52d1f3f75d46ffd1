/*
 * button: a voting button on Linux, from the firmware reference. One line on stdin is one
 * press (the option's index); its outbox lives in a file, its flash. libmosquitto is its MQTT
 * client, as esp-mqtt or Zephyr's would be on a microcontroller: the library decides what to
 * send and what an ack settles, this file only moves bytes (devices/c/README.md).
 *
 *   button --device ID --poll ID --store FILE [--host H] [--port P] [--password PW]
 *          [--slots N] [--heartbeat-s S] [--receipt]
 *   button --store FILE --slots N --print-outbox      the votes the file holds, then exit
 *
 * Prints a line per event: "stored EPOCH SEQ", "sent POLL BYTES", "settled EPOCH SEQ CODE"
 * (and "receipt SHARD ENTRY" after it for a receipt), "outbox N", "connected",
 * "disconnected".
 */
#include <errno.h>
#include <fcntl.h>
#include <mosquitto.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../votebox.h"

/* ---- Flash in a file: per slot two copies, each saved whole before it counts ------------- */

/* A copy: generation (4), length (2), data, checksum (4). Saving writes the older copy with
 * the next generation and fsyncs it; loading takes the newest whole copy, so a save cut by a
 * crash leaves the previous contents, as vb_store requires. */
#define COPY_SIZE (10u + VB_SLOT_MAX)

static int store_fd = -1;

static uint32_t read_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void write_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* The newest whole copy of `slot`: its index (0 or 1) and generation, or -1 for none. */
static int newest(unsigned slot, uint8_t copies[2][COPY_SIZE], uint32_t *generation)
{
    int best = -1, i;
    for (i = 0; i < 2; i++) {
        off_t at = (off_t)((slot * 2u + (unsigned)i) * COPY_SIZE);
        size_t len;
        memset(copies[i], 0, COPY_SIZE);
        if (pread(store_fd, copies[i], COPY_SIZE, at) != (ssize_t)COPY_SIZE) {
            continue;
        }
        len = (size_t)copies[i][4] << 8 | copies[i][5];
        if (len > VB_SLOT_MAX || read_u32(copies[i]) == 0u ||
            vb_checksum(copies[i], 6u + len) != read_u32(copies[i] + 6u + len)) {
            continue;
        }
        if (best < 0 || read_u32(copies[i]) > *generation) {
            best = i;
            *generation = read_u32(copies[i]);
        }
    }
    return best;
}

static int file_save(void *ctx, unsigned slot, const uint8_t *data, size_t len)
{
    uint8_t copies[2][COPY_SIZE], copy[COPY_SIZE];
    uint32_t generation = 0;
    int current = newest(slot, copies, &generation), target = current == 0 ? 1 : 0;
    (void)ctx;
    if (len > VB_SLOT_MAX) {
        return -1;
    }
    memset(copy, 0, sizeof copy);
    write_u32(copy, generation + 1u);
    copy[4] = (uint8_t)(len >> 8);
    copy[5] = (uint8_t)len;
    if (len > 0u) {
        memcpy(copy + 6, data, len);
    }
    write_u32(copy + 6u + len, vb_checksum(copy, 6u + len));
    if (pwrite(store_fd, copy, COPY_SIZE, (off_t)((slot * 2u + (unsigned)target) * COPY_SIZE)) !=
            (ssize_t)COPY_SIZE ||
        fdatasync(store_fd) != 0) {
        return -1;
    }
    return 0;
}

static int file_load(void *ctx, unsigned slot, uint8_t *data, size_t room)
{
    uint8_t copies[2][COPY_SIZE];
    uint32_t generation = 0;
    int best = newest(slot, copies, &generation);
    size_t len;
    (void)ctx;
    if (best < 0) {
        return 0;
    }
    len = (size_t)copies[best][4] << 8 | copies[best][5];
    if (len > room) {
        return -1;
    }
    memcpy(data, copies[best] + 6, len);
    return (int)len;
}

/* ---- The button ------------------------------------------------------------------------- */

static struct {
    const char *host, *device, *password, *poll, *store;
    int port, heartbeat_s, receipt;
    unsigned slots;
} opt = {"127.0.0.1", NULL, NULL, NULL, NULL, 1883, 60, 0, 64};

static vb_outbox outbox;
static int connected;
static unsigned last_depth = ~0u;

static uint32_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint32_t)((uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u);
}

static void say_depth(void)
{
    unsigned depth = vb_outbox_depth(&outbox);
    if (depth != last_depth) {
        printf("outbox %u\n", depth);
        fflush(stdout);
        last_depth = depth;
    }
}

static void on_settled(void *ctx, const vb_record *record, const vb_ack_entry *entry)
{
    (void)ctx;
    printf("settled %llu %llu %llu\n", (unsigned long long)record->epoch,
           (unsigned long long)record->seq, (unsigned long long)entry->code);
    if (entry->has_receipt) {
        printf("receipt %llu %llu\n", (unsigned long long)entry->shard,
               (unsigned long long)entry->entry);
    }
}

static void on_connect(struct mosquitto *mosq, void *ctx, int rc)
{
    char topic[128];
    uint8_t status[8];
    int n = vb_encode_status(1, status, sizeof status);
    (void)ctx;
    if (rc != 0) {
        return;
    }
    snprintf(topic, sizeof topic, "acks/%s", opt.device);
    mosquitto_subscribe(mosq, NULL, topic, 1);
    snprintf(topic, sizeof topic, "devices/%s/status", opt.device);
    mosquitto_publish(mosq, NULL, topic, n, status, 1, true);
    vb_outbox_reconnected(&outbox); /* rule 4: everything stored goes again */
    connected = 1;
    printf("connected\n");
    fflush(stdout);
}

static void on_disconnect(struct mosquitto *mosq, void *ctx, int rc)
{
    (void)mosq;
    (void)ctx;
    (void)rc;
    connected = 0;
    printf("disconnected\n");
    fflush(stdout);
}

static void on_message(struct mosquitto *mosq, void *ctx, const struct mosquitto_message *m)
{
    (void)mosq;
    (void)ctx;
    if (vb_outbox_ack(&outbox, m->payload, (size_t)m->payloadlen, now_ms(), on_settled, NULL) ==
        VB_E_STORE) {
        fprintf(stderr, "button: the store failed while settling an ack\n");
    }
    fflush(stdout);
    say_depth();
}

static void press(const char *line)
{
    vb_vote vote;
    int slot;
    char *end;
    unsigned long long option = strtoull(line, &end, 10);
    if (end == line) {
        return;
    }
    memset(&vote, 0, sizeof vote);
    vote.n_choices = 1;
    vote.choice[0] = option;
    vote.has_ts = 1;
    vote.ts = (uint64_t)time(NULL);
    vote.receipt = (uint8_t)opt.receipt;
    slot = vb_outbox_press(&outbox, opt.poll, &vote);
    if (slot < 0) {
        printf("refused %d\n", slot); /* the outbox is full, or the flash failed */
    } else {
        printf("stored %llu %llu\n", (unsigned long long)vote.epoch,
               (unsigned long long)vote.seq);
    }
    fflush(stdout);
    say_depth();
}

static void send_due(struct mosquitto *mosq)
{
    static uint8_t payload[VB_MAX_PAYLOAD];
    char poll[VB_ID_MAX + 1], topic[160];
    int n;
    while (connected &&
           (n = vb_outbox_next(&outbox, now_ms(), poll, sizeof poll, payload, sizeof payload)) > 0) {
        snprintf(topic, sizeof topic, "votes/%s/%s", poll, opt.device);
        if (mosquitto_publish(mosq, NULL, topic, n, payload, 1, false) != MOSQ_ERR_SUCCESS) {
            vb_outbox_reconnected(&outbox); /* not handed to the client: again next time */
            break;
        }
        printf("sent %s %d\n", poll, n);
        fflush(stdout);
    }
}

static void heartbeat(struct mosquitto *mosq, uint32_t started)
{
    uint8_t payload[32];
    char topic[128];
    int n = vb_encode_heartbeat((now_ms() - started) / 1000u, vb_outbox_depth(&outbox), -1,
                                payload, sizeof payload);
    snprintf(topic, sizeof topic, "devices/%s/heartbeat", opt.device);
    if (n > 0) {
        mosquitto_publish(mosq, NULL, topic, n, payload, 0, false);
    }
}

static int parse_args(int argc, char **argv, int *print_outbox)
{
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--print-outbox") == 0) {
            *print_outbox = 1;
            continue;
        }
        if (strcmp(a, "--receipt") == 0) {
            opt.receipt = 1;
            continue;
        }
        if (v == NULL) {
            return -1;
        }
        i++;
        if (strcmp(a, "--host") == 0) opt.host = v;
        else if (strcmp(a, "--port") == 0) opt.port = atoi(v);
        else if (strcmp(a, "--device") == 0) opt.device = v;
        else if (strcmp(a, "--password") == 0) opt.password = v;
        else if (strcmp(a, "--poll") == 0) opt.poll = v;
        else if (strcmp(a, "--store") == 0) opt.store = v;
        else if (strcmp(a, "--slots") == 0) opt.slots = (unsigned)atoi(v);
        else if (strcmp(a, "--heartbeat-s") == 0) opt.heartbeat_s = atoi(v);
        else return -1;
    }
    return opt.store != NULL && opt.slots > 0u &&
                   (*print_outbox || (opt.device != NULL && opt.poll != NULL))
               ? 0
               : -1;
}

int main(int argc, char **argv)
{
    static vb_record records[4096];
    char line[256];
    struct mosquitto *mosq;
    struct pollfd in = {STDIN_FILENO, POLLIN, 0};
    vb_store store = {file_save, file_load, NULL};
    int print_outbox = 0, stdin_open = 1, loaded, quit = 0;
    size_t line_len = 0;
    uint32_t started = now_ms(), next_beat, retry_at = 0, ceiling_ms = 1000;
    char will_topic[128];
    if (parse_args(argc, argv, &print_outbox) != 0 || opt.slots > 4096u) {
        fprintf(stderr, "usage: button --device ID --poll ID --store FILE [--host H] [--port P] "
                        "[--password PW] [--slots N<=4096] [--heartbeat-s S] [--receipt]\n"
                        "       button --store FILE --slots N --print-outbox\n");
        return 2;
    }
    store_fd = open(opt.store, O_RDWR | O_CREAT, 0600);
    if (store_fd < 0) {
        fprintf(stderr, "button: cannot open %s: %s\n", opt.store, strerror(errno));
        return 1;
    }
    /* A new file is a new store: its epoch is the time now, higher than any before (rule 2). */
    loaded = vb_outbox_open(&outbox, records, opt.slots, store, (uint64_t)time(NULL),
                            (uint32_t)getpid() ^ started);
    if (loaded < 0) {
        fprintf(stderr, "button: cannot use the store %s (%d)\n", opt.store, loaded);
        return 1;
    }
    if (print_outbox) {
        printf("%u\n", vb_outbox_depth(&outbox));
        return 0;
    }
    say_depth();
    srand((unsigned)getpid() ^ (unsigned)time(NULL)); /* devices must not retry in step */
    mosquitto_lib_init();
    mosq = mosquitto_new(opt.device, false, NULL); /* a persistent session: acks wait for it */
    if (mosq == NULL) {
        return 1;
    }
    mosquitto_username_pw_set(mosq, opt.device, opt.password);
    snprintf(will_topic, sizeof will_topic, "devices/%s/status", opt.device);
    mosquitto_will_set(mosq, will_topic, 7, "offline", 1, true);
    mosquitto_connect_callback_set(mosq, on_connect);
    mosquitto_disconnect_callback_set(mosq, on_disconnect);
    mosquitto_message_callback_set(mosq, on_message);
    if (mosquitto_connect(mosq, opt.host, opt.port, 30) != MOSQ_ERR_SUCCESS) {
        retry_at = now_ms() + (uint32_t)(rand() % (int)ceiling_ms);
    }
    next_beat = now_ms() + (uint32_t)opt.heartbeat_s * 1000u;
    for (;;) {
        int rc = mosquitto_loop(mosq, 20, 1);
        if (rc != MOSQ_ERR_SUCCESS && (int32_t)(now_ms() - retry_at) >= 0) {
            /* Rule 6: a random wait below a ceiling that doubles, 1 s up to 60 s. */
            if (mosquitto_reconnect(mosq) != MOSQ_ERR_SUCCESS) {
                retry_at = now_ms() + (uint32_t)(rand() % (int)ceiling_ms);
                ceiling_ms = ceiling_ms < 30000u ? ceiling_ms * 2u : 60000u;
            } else {
                ceiling_ms = 1000;
            }
        }
        if (rc != MOSQ_ERR_SUCCESS) {
            struct timespec pause = {0, 20000000}; /* offline: no busy loop */
            nanosleep(&pause, NULL);
        }
        if (stdin_open && poll(&in, 1, 0) > 0) {
            /* read(), not stdio: poll() sees the descriptor, not what stdio has buffered. */
            ssize_t got = read(STDIN_FILENO, line + line_len, sizeof line - 1u - line_len);
            char *start = line, *end;
            if (got <= 0) {
                stdin_open = 0; /* presses are over; the button goes on until its outbox is empty */
            } else {
                line_len += (size_t)got;
                line[line_len] = '\0';
                while ((end = strchr(start, '\n')) != NULL) {
                    *end = '\0';
                    if (strncmp(start, "quit", 4) == 0) {
                        quit = 1;
                        break;
                    }
                    press(start);
                    start = end + 1;
                }
                line_len -= (size_t)(start - line);
                memmove(line, start, line_len);
                if (line_len == sizeof line - 1u) {
                    line_len = 0; /* a line too long to be a press */
                }
            }
        }
        if (quit) {
            break;
        }
        send_due(mosq);
        if ((int32_t)(now_ms() - next_beat) >= 0) {
            heartbeat(mosq, started);
            next_beat = now_ms() + (uint32_t)opt.heartbeat_s * 1000u;
        }
        if (!stdin_open && vb_outbox_depth(&outbox) == 0u) {
            break;
        }
    }
    if (connected) {
        uint8_t status[8];
        int n = vb_encode_status(0, status, sizeof status);
        mosquitto_publish(mosq, NULL, will_topic, n, status, 1, true);
        mosquitto_loop(mosq, 100, 1);
        mosquitto_disconnect(mosq);
    }
    mosquitto_destroy(mosq);
    mosquitto_lib_cleanup();
    close(store_fd);
    return 0;
}
