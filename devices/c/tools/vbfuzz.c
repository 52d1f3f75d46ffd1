/*
 * vbfuzz: the library under AddressSanitizer and UndefinedBehaviorSanitizer, fed what a
 * hostile network and a failing power supply give a button. Not firmware.
 *
 *   vbfuzz SEED ACKS OPS
 *
 * 1. ACKS ack payloads, generated (valid, with receipts, rate limited...) then mutated (bytes
 *    flipped, cut short, lengthened, heads forged), through vb_decode_ack and vb_outbox_ack.
 * 2. OPS random steps on an outbox over a simulated flash: press, send, ack (accepted,
 *    duplicate, stale_epoch, rate limited, unknown codes), reconnect, reboot, and a power cut
 *    inside any save (the save either lands whole or not at all, as vb_store requires), after
 *    which the device boots again from what the flash holds.
 *
 * Checked after every step: no seq is ever given twice in an epoch (across cuts and reboots
 * too), the outbox holds exactly the votes its flash holds (none lost, none made up), and it
 * never holds more than its capacity. Prints "ok" and the counts, or exits 1 naming the step.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../votebox.h"

#define CAPACITY 24u
#define SLOTS (CAPACITY + 1u)

static uint64_t rng = 88172645463325252ull;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static unsigned below(unsigned n) { return (unsigned)(next() % n); }

/* ---- The simulated flash: slots, a save that may be the last before the power goes ------- */

static uint8_t flash[SLOTS][VB_SLOT_MAX];
static size_t flash_len[SLOTS];
static int cut_after = -1; /* saves left before the power goes; -1: none planned */
static int power_out;

static int save(void *ctx, unsigned slot, const uint8_t *data, size_t len)
{
    (void)ctx;
    if (slot >= SLOTS || len > VB_SLOT_MAX || power_out) {
        return -1;
    }
    if (cut_after == 0) {
        power_out = 1; /* the power goes during this save: it lands whole or not at all */
        if (next() & 1u) {
            return -1;
        }
    } else if (cut_after > 0) {
        cut_after--;
    }
    if (len > 0u) {
        memcpy(flash[slot], data, len);
    }
    flash_len[slot] = len;
    return power_out ? -1 : 0;
}

static int load(void *ctx, unsigned slot, uint8_t *data, size_t room)
{
    (void)ctx;
    if (slot >= SLOTS || flash_len[slot] > room) {
        return -1;
    }
    memcpy(data, flash[slot], flash_len[slot]);
    return (int)flash_len[slot];
}

/* ---- Every (epoch, seq) ever given to a stored vote ------------------------------------- */

#define SEEN_MAX 1000000u
static uint64_t seen_epoch[SEEN_MAX], seen_seq[SEEN_MAX];
static unsigned seen_n;

static int seen_before(uint64_t epoch, uint64_t seq)
{
    unsigned i;
    for (i = seen_n; i-- > 0;) {
        if (seen_epoch[i] == epoch && seen_seq[i] == seq) {
            return 1;
        }
    }
    return 0;
}

static void fail(const char *what, unsigned step)
{
    printf("FAILED at step %u: %s\n", step, what);
    exit(1);
}

/* Records whose (epoch, seq) the test has not met yet: each must be new. */
static void note_ids(const vb_outbox *ob, unsigned step)
{
    static uint64_t known_epoch[CAPACITY], known_seq[CAPACITY];
    static uint8_t known_used[CAPACITY];
    unsigned i;
    for (i = 0; i < CAPACITY; i++) {
        const vb_record *r = &ob->records[i];
        if (!r->used) {
            known_used[i] = 0;
            continue;
        }
        if (known_used[i] && known_epoch[i] == r->epoch && known_seq[i] == r->seq) {
            continue;
        }
        if (seen_before(r->epoch, r->seq)) {
            fail("a seq given twice in one epoch", step);
        }
        if (seen_n < SEEN_MAX) {
            seen_epoch[seen_n] = r->epoch;
            seen_seq[seen_n++] = r->seq;
        }
        known_used[i] = 1;
        known_epoch[i] = r->epoch;
        known_seq[i] = r->seq;
    }
}

static unsigned votes_in_flash(void)
{
    unsigned slot, n = 0;
    for (slot = 1; slot < SLOTS; slot++) {
        n += flash_len[slot] > 0u;
    }
    return n;
}

/* An ack naming some of the outbox's votes (and sometimes none of them). */
static size_t make_ack(const vb_outbox *ob, uint8_t *out, size_t room)
{
    static const uint64_t codes[] = {0, 0, 0, 1, 3, 4, 25, 27, 27, 31, 40, 200};
    uint8_t entries[64][24];
    size_t lens[64], n = 0, at = 0, i;
    unsigned r;
    for (r = 0; r < CAPACITY && n < 64u; r++) {
        const vb_record *rec = &ob->records[r];
        uint64_t code = codes[below(sizeof codes / sizeof codes[0])];
        uint8_t *e = entries[n];
        size_t k = 0;
        int receipt = code == 0u && below(2) == 0u;
        if (!rec->used || below(3) == 0u) {
            continue;
        }
        e[k++] = receipt ? 0x85 : 0x83;
        e[k++] = 0x1b; /* each uint in 8 bytes: a decoder takes any length */
        for (i = 0; i < 8u; i++) e[k++] = (uint8_t)(rec->epoch >> (56u - 8u * i));
        e[k++] = 0x1b;
        for (i = 0; i < 8u; i++) e[k++] = (uint8_t)(rec->seq >> (56u - 8u * i));
        e[k++] = code < 24u ? (uint8_t)code : 0x18;
        if (code >= 24u) e[k++] = (uint8_t)code;
        if (receipt) {
            e[k++] = 0x00;
            e[k++] = (uint8_t)below(24);
        }
        lens[n++] = k;
    }
    if (below(8) == 0u && n < 64u) {
        memcpy(entries[n], "\x83\xf6\xf6\x18\x21", 5); /* rate limited */
        lens[n++] = 5;
    }
    if (room < 1u) {
        return 0;
    }
    out[at++] = (uint8_t)(0x80 | (n < 24u ? n : 24u));
    if (n >= 24u) out[at++] = (uint8_t)n;
    for (i = 0; i < n && at + lens[i] <= room; i++) {
        memcpy(out + at, entries[i], lens[i]);
        at += lens[i];
    }
    return at;
}

static void mutate(uint8_t *p, size_t *n, size_t room)
{
    unsigned k, times = 1u + below(4);
    for (k = 0; k < times; k++) {
        switch (below(6)) {
        case 0: if (*n) p[below((unsigned)*n)] ^= (uint8_t)(1u << below(8)); break;
        case 1: if (*n) p[below((unsigned)*n)] = (uint8_t)next(); break;
        case 2: if (*n) *n = below((unsigned)*n); break;                  /* cut short */
        case 3: if (*n < room) p[(*n)++] = (uint8_t)next(); break;       /* a byte more */
        case 4: if (*n) p[0] = (uint8_t)(0x9b); break;                   /* a huge count */
        default: if (*n > 1u) p[1 + below((unsigned)*n - 1u)] = 0x1f | (uint8_t)(next() & 0xe0u);
        }
    }
}

static void settled(void *ctx, const vb_record *record, const vb_ack_entry *entry)
{
    (void)record;
    (void)entry;
    (*(unsigned *)ctx)++;
}

static vb_record records[CAPACITY];
static vb_outbox ob;
static uint64_t boots = 1;

static void boot(unsigned step)
{
    vb_store store = {save, load, NULL};
    power_out = 0;
    cut_after = -1;
    boots++;
    if (vb_outbox_open(&ob, records, CAPACITY, store, 1000000u + boots, (uint32_t)next()) < 0) {
        fail("the outbox did not open", step);
    }
    if (vb_outbox_depth(&ob) != votes_in_flash()) {
        fail("the outbox does not hold what its flash holds", step);
    }
}

int main(int argc, char **argv)
{
    unsigned long acks, ops, step, settled_n = 0, pressed = 0, sent = 0, cuts = 0, malformed = 0;
    static uint8_t ack[VB_MAX_PAYLOAD + 64], payload[VB_MAX_PAYLOAD];
    static vb_ack_entry entries[512];
    char poll[VB_ID_MAX + 1];
    uint32_t now = 0;
    if (argc != 4) {
        fprintf(stderr, "usage: vbfuzz SEED ACKS OPS\n");
        return 2;
    }
    rng ^= strtoull(argv[1], NULL, 10) * 2654435761ull;
    acks = strtoul(argv[2], NULL, 10);
    ops = strtoul(argv[3], NULL, 10);
    boot(0);

    /* 1. Acks, generated and mutated. */
    for (step = 0; step < acks; step++) {
        size_t n;
        uint8_t *exact;
        vb_vote v;
        if (vb_outbox_depth(&ob) < 8u) {
            memset(&v, 0, sizeof v);
            v.n_choices = 1;
            (void)vb_outbox_press(&ob, "p", &v);
        }
        n = make_ack(&ob, ack, sizeof ack);
        if (step % 4u != 0u) {
            mutate(ack, &n, sizeof ack);
        }
        /* In a heap block of exactly its length: a read past the end is one ASan sees. */
        exact = malloc(n > 0u ? n : 1u);
        if (exact == NULL) {
            return 2;
        }
        memcpy(exact, ack, n);
        if (vb_decode_ack(exact, n, entries, sizeof entries / sizeof entries[0]) < 0) {
            malformed++;
        }
        (void)vb_decode_ack(exact, n, NULL, 0);
        if (vb_outbox_ack(&ob, exact, n, now, settled, &settled_n) == VB_E_STORE) {
            fail("a store error with no power cut", (unsigned)step);
        }
        free(exact);
        now += 100;
    }
    note_ids(&ob, 0);

    /* 2. Presses, sends, acks, reconnects, reboots and power cuts. */
    for (step = 0; step < ops; step++) {
        unsigned what = below(100);
        if (what < 35u) {
            vb_vote v;
            memset(&v, 0, sizeof v);
            v.n_choices = (uint8_t)(1u + below(3));
            v.choice[0] = below(5);
            v.choice[1] = 5u + below(5);
            v.choice[2] = 10u + below(5);
            v.has_ts = (uint8_t)below(2);
            v.ts = 1765000000u + below(1000);
            v.receipt = (uint8_t)below(2);
            if (below(10) == 0u) {
                cut_after = (int)below(3);
            }
            if (vb_outbox_press(&ob, below(2) ? "p" : "q-2", &v) >= 0) {
                pressed++;
            }
        } else if (what < 60u) {
            int n;
            while ((n = vb_outbox_next(&ob, now, poll, sizeof poll, payload, sizeof payload)) > 0) {
                sent++;
            }
            if (n < 0) {
                fail("next failed", (unsigned)step);
            }
        } else if (what < 85u) {
            size_t n = make_ack(&ob, ack, sizeof ack);
            if (below(10) == 0u) {
                cut_after = (int)below(4);
            }
            (void)vb_outbox_ack(&ob, ack, n, now, settled, &settled_n);
        } else if (what < 92u) {
            vb_outbox_reconnected(&ob);
        } else {
            boot((unsigned)step); /* a reboot, or the end of a power cut */
        }
        if (power_out) {
            cuts++;
            boot((unsigned)step);
        }
        note_ids(&ob, (unsigned)step);
        if (vb_outbox_depth(&ob) > CAPACITY || vb_outbox_depth(&ob) != votes_in_flash()) {
            fail("the outbox and its flash disagree", (unsigned)step);
        }
        now += 1000u + below(40000);
    }
    printf("ok acks=%lu malformed=%lu ops=%lu pressed=%lu sent=%lu settled=%lu cuts=%lu "
           "ids=%u\n",
           acks, malformed, ops, pressed, sent, settled_n, cuts, seen_n);
    return 0;
}
