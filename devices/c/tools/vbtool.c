/*
 * vbtool: the library's encoder and ack reader over stdin and stdout, one command a line, so
 * that tests/test_c_firmware.py drives the C code with generated input. Not firmware.
 *
 *   vote CHOICES SEQ TS EPOCH VOTER RECEIPT AS_LIST  ->  hex, or "error N"
 *        CHOICES "3" or "1,4"; TS and VOTER "-" for none; VOTER in hex
 *   batch HEX HEX ...                                ->  hex
 *   heartbeat UPTIME OUTBOX BATTERY                  ->  hex (BATTERY -1: none)
 *   status 1|0                                       ->  hex
 *   ack HEX                                          ->  "EPOCH SEQ CODE[ SHARD ENTRY]" a line
 *                                                        per entry (- for null), then "end"
 *
 * And an outbox over a flash in memory, which survives "open" (a reboot) but not "wipe":
 *   open CAPACITY EPOCH_IF_NEW   ->  "loaded N epoch E next S"
 *   press POLL CHOICE            ->  "stored EPOCH SEQ", or "error N"
 *   next NOW_MS                  ->  "POLL HEX", or "none"
 *   settle HEX NOW_MS            ->  "left N" (the ack applied), or "error N"
 *   reconnect | depth | wipe     ->  "ok" | N | "ok"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../votebox.h"

static void print_hex(const uint8_t *p, int n)
{
    int i;
    if (n < 0) {
        printf("error %d\n", n);
        return;
    }
    for (i = 0; i < n; i++) {
        printf("%02x", p[i]);
    }
    printf("\n");
}

static size_t from_hex(const char *text, uint8_t *out, size_t room)
{
    size_t n = 0;
    while (text[0] != '\0' && text[1] != '\0' && n < room) {
        unsigned byte;
        if (sscanf(text, "%2x", &byte) != 1) {
            break;
        }
        out[n++] = (uint8_t)byte;
        text += 2;
    }
    return n;
}

static uint8_t buf[VB_MAX_PAYLOAD + 16];

static void vote(char *args)
{
    vb_vote v;
    uint8_t voter[64];
    char *choices = strtok(args, " "), *seq = strtok(NULL, " "), *ts = strtok(NULL, " ");
    char *epoch = strtok(NULL, " "), *voter_hex = strtok(NULL, " ");
    char *receipt = strtok(NULL, " "), *as_list = strtok(NULL, " \n");
    char *choice;
    if (as_list == NULL) {
        printf("error usage\n");
        return;
    }
    memset(&v, 0, sizeof v);
    for (choice = strtok(choices, ","); choice != NULL; choice = strtok(NULL, ",")) {
        if (v.n_choices >= VB_MAX_CHOICES) {
            printf("error %d\n", VB_E_ARG);
            return;
        }
        v.choice[v.n_choices++] = strtoull(choice, NULL, 10);
    }
    v.seq = strtoull(seq, NULL, 10);
    v.has_ts = strcmp(ts, "-") != 0;
    v.ts = v.has_ts ? strtoull(ts, NULL, 10) : 0;
    v.epoch = strtoull(epoch, NULL, 10);
    if (strcmp(voter_hex, "-") != 0) {
        v.voter = voter;
        v.voter_len = (uint8_t)from_hex(voter_hex, voter, sizeof voter);
    }
    v.receipt = (uint8_t)atoi(receipt);
    v.as_list = (uint8_t)atoi(as_list);
    print_hex(buf, vb_encode_vote(&v, buf, sizeof buf));
}

static void batch(char *args)
{
    static uint8_t votes[256][VB_VOTE_MAX * 8];
    const uint8_t *parts[256];
    size_t lengths[256], n = 0;
    char *hex;
    for (hex = strtok(args, " \n"); hex != NULL && n < 256; hex = strtok(NULL, " \n")) {
        lengths[n] = from_hex(hex, votes[n], sizeof votes[n]);
        parts[n] = votes[n];
        n++;
    }
    print_hex(buf, vb_encode_batch(parts, lengths, n, buf, sizeof buf));
}

static void ack(char *args)
{
    static uint8_t bytes[VB_MAX_PAYLOAD * 2];
    static vb_ack_entry entries[VB_MAX_PAYLOAD];
    size_t n = from_hex(strtok(args, " \n") ? args : "", bytes, sizeof bytes);
    int count = vb_decode_ack(bytes, n, entries, VB_MAX_PAYLOAD), i;
    if (count < 0) {
        printf("error %d\n", count);
        return;
    }
    for (i = 0; i < count; i++) {
        const vb_ack_entry *e = &entries[i];
        if (e->names_vote) {
            printf("%llu %llu", (unsigned long long)e->epoch, (unsigned long long)e->seq);
        } else {
            printf("- -");
        }
        printf(" %llu", (unsigned long long)e->code);
        if (e->has_receipt) {
            printf(" %llu %llu", (unsigned long long)e->shard, (unsigned long long)e->entry);
        }
        printf("\n");
    }
    printf("end\n");
}

#define FLASH_SLOTS 5001u
static uint8_t flash[FLASH_SLOTS][VB_SLOT_MAX];
static size_t flash_len[FLASH_SLOTS];
static vb_record records[FLASH_SLOTS - 1u];
static vb_outbox outbox;

static int mem_save(void *ctx, unsigned slot, const uint8_t *data, size_t len)
{
    (void)ctx;
    if (slot >= FLASH_SLOTS || len > VB_SLOT_MAX) {
        return -1;
    }
    if (len > 0u) {
        memcpy(flash[slot], data, len);
    }
    flash_len[slot] = len;
    return 0;
}

static int mem_load(void *ctx, unsigned slot, uint8_t *data, size_t room)
{
    (void)ctx;
    if (slot >= FLASH_SLOTS || flash_len[slot] > room) {
        return -1;
    }
    memcpy(data, flash[slot], flash_len[slot]);
    return (int)flash_len[slot];
}

static void outbox_command(const char *command, char *rest)
{
    static uint8_t bytes[VB_MAX_PAYLOAD * 2];
    char poll[VB_ID_MAX + 1];
    if (strcmp(command, "open") == 0) {
        vb_store store = {mem_save, mem_load, NULL};
        unsigned capacity = 0;
        unsigned long long epoch = 0;
        int loaded;
        if (sscanf(rest, "%u %llu", &capacity, &epoch) != 2 || capacity >= FLASH_SLOTS) {
            printf("error usage\n");
            return;
        }
        loaded = vb_outbox_open(&outbox, records, capacity, store, epoch, 7);
        printf("loaded %d epoch %llu next %llu\n", loaded, (unsigned long long)outbox.epoch,
               (unsigned long long)outbox.next_seq);
    } else if (strcmp(command, "press") == 0) {
        vb_vote v;
        char *poll_id = strtok(rest, " "), *choice = strtok(NULL, " \n");
        int slot;
        memset(&v, 0, sizeof v);
        v.n_choices = 1;
        v.choice[0] = choice != NULL ? strtoull(choice, NULL, 10) : 0u;
        slot = vb_outbox_press(&outbox, poll_id != NULL ? poll_id : "", &v);
        if (slot < 0) {
            printf("error %d\n", slot);
        } else {
            printf("stored %llu %llu\n", (unsigned long long)v.epoch, (unsigned long long)v.seq);
        }
    } else if (strcmp(command, "next") == 0) {
        int n = vb_outbox_next(&outbox, (uint32_t)strtoul(rest, NULL, 10), poll, sizeof poll,
                               buf, sizeof buf);
        if (n == 0) {
            printf("none\n");
        } else {
            if (n > 0) {
                printf("%s ", poll);
            }
            print_hex(buf, n);
        }
    } else if (strcmp(command, "settle") == 0) {
        char *hex = strtok(rest, " "), *now = strtok(NULL, " \n");
        size_t n = hex != NULL ? from_hex(hex, bytes, sizeof bytes) : 0u;
        int left = vb_outbox_ack(&outbox, bytes, n, now != NULL ? (uint32_t)strtoul(now, NULL, 10) : 0u,
                                 NULL, NULL);
        if (left < 0) {
            printf("error %d\n", left);
        } else {
            printf("left %d\n", left);
        }
    } else if (strcmp(command, "reconnect") == 0) {
        vb_outbox_reconnected(&outbox);
        printf("ok\n");
    } else if (strcmp(command, "depth") == 0) {
        printf("%u\n", vb_outbox_depth(&outbox));
    } else if (strcmp(command, "wipe") == 0) {
        memset(flash_len, 0, sizeof flash_len);
        printf("ok\n");
    } else {
        printf("error unknown command\n");
    }
}

int main(void)
{
    static char line[65536];
    while (fgets(line, sizeof line, stdin) != NULL) {
        char *rest;
        line[strcspn(line, "\n")] = '\0';
        rest = strchr(line, ' ');
        if (rest != NULL) {
            *rest++ = '\0';
        } else {
            rest = line + strlen(line);
        }
        if (strcmp(line, "vote") == 0) {
            vote(rest);
        } else if (strcmp(line, "batch") == 0) {
            batch(rest);
        } else if (strcmp(line, "heartbeat") == 0) {
            unsigned long long up = 0, box = 0;
            int battery = -1;
            if (sscanf(rest, "%llu %llu %d", &up, &box, &battery) != 3) {
                printf("error usage\n");
            } else {
                print_hex(buf, vb_encode_heartbeat(up, box, battery, buf, sizeof buf));
            }
        } else if (strcmp(line, "status") == 0) {
            print_hex(buf, vb_encode_status(atoi(rest), buf, sizeof buf));
        } else if (strcmp(line, "ack") == 0) {
            ack(rest);
        } else {
            outbox_command(line, rest);
        }
        fflush(stdout);
    }
    return 0;
}
