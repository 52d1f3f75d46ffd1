/*
 * votebox.h: the device's side of docs/protocol.md in portable C99, for firmware to vendor.
 *
 * Two files, this header and votebox.c. No dynamic memory, no CBOR library, no MQTT library:
 * the caller owns every buffer, gives the outbox its array of records and two callbacks that
 * reach its flash, and publishes what the outbox says to publish with its own MQTT client.
 * devices/c/README.md says how to port it.
 *
 * Every function that writes checks the room it is given: it returns VB_E_SPACE, never writes
 * past the end. Every function that reads bytes from the network checks each length before
 * reading: it returns VB_E_MALFORMED, never reads past the end.
 */
#ifndef VOTEBOX_H
#define VOTEBOX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Limits (docs/protocol.md, Limits; the device's side, rules 4 and 5) ------------------ */

#define VB_MAX_PAYLOAD 4096u   /* a message's payload, a batch's too */
#define VB_MAX_CHOICES 32u     /* options in one choice */
#define VB_MAX_VOTER 32u       /* bytes of a voter token */
#define VB_MAX_UINT 9007199254740991ull /* 2^53 - 1: every integer the processor takes */
#define VB_BATCH_VOTES 64u     /* votes per message this library sends (rule 4) */
#define VB_WINDOW 4096u        /* the processor's de-duplication window (rule 5) */
#define VB_RESEND_MS 30000u    /* a vote with no ack after this goes again (rule 4) */
#define VB_ID_MAX 64u          /* poll and device ids: [A-Za-z0-9_-], 1 to 64 */

/* The largest encoded vote a record keeps. A single-choice vote with a time, an epoch and a
 * receipt request is at most 33 bytes; a choice of 32 options up to 330. Define it before
 * including this header (and in votebox.c's build) to trade RAM for larger choices. */
#ifndef VB_VOTE_MAX
#define VB_VOTE_MAX 64u
#endif

/* ---- Errors: every function returns one of these, or a length or count >= 0 ------------- */

#define VB_OK 0
#define VB_E_SPACE (-1)     /* the buffer given is too small */
#define VB_E_ARG (-2)       /* an argument breaks the protocol (an integer above 2^53 - 1...) */
#define VB_E_MALFORMED (-3) /* the bytes are not an ack */
#define VB_E_FULL (-4)      /* the outbox has no free record: the press is refused */
#define VB_E_STORE (-5)     /* the save callback failed: nothing was stored */

/* ---- Codes of an ack (docs/protocol.md, Codes): 0-15 fates, 16 and up reasons ----------- */

#define VB_ACCEPTED 0
#define VB_DUPLICATE 1
#define VB_SUPERSEDED 3
#define VB_SUPPRESSED 4
#define VB_STALE_EPOCH 27  /* not counted: kept, and stored again in a higher epoch (rule 2) */
#define VB_RATE_LIMITED 33 /* not an answer for any vote: pause, then send again (rule 3) */

/* ---- Encoding ---------------------------------------------------------------------------- */

/* One vote as docs/protocol.md, Votes, says: a CBOR map with keys in ascending order, each
 * integer in its shortest form, optional keys only when set. */
typedef struct {
    uint64_t choice[VB_MAX_CHOICES]; /* option indexes (a rating's value) */
    uint8_t n_choices;               /* 1 to VB_MAX_CHOICES */
    uint8_t as_list;                 /* 1: an array even of one option (multiple choice) */
    uint64_t seq;
    uint64_t epoch;                  /* 0 is left out */
    uint8_t has_ts;
    uint64_t ts;                     /* the device's Unix time, s, when has_ts */
    const uint8_t *voter;            /* a voter token, or NULL */
    uint8_t voter_len;               /* 1 to VB_MAX_VOTER when voter is set */
    uint8_t receipt;                 /* 1: ask for a receipt (key 5) */
} vb_vote;

/* Each returns the length written, or VB_E_SPACE / VB_E_ARG. */
int vb_encode_vote(const vb_vote *vote, uint8_t *out, size_t room);
/* A batch: a CBOR array of n (1 to 256) already encoded votes. */
int vb_encode_batch(const uint8_t *const *votes, const size_t *lengths, size_t n, uint8_t *out,
                    size_t room);
/* A heartbeat (docs/protocol.md, Device health); battery < 0 leaves it out (mains power). */
int vb_encode_heartbeat(uint64_t uptime_s, uint64_t outbox, int battery, uint8_t *out,
                        size_t room);
/* A status: the text "online" or "offline", no terminating zero. */
int vb_encode_status(int online, uint8_t *out, size_t room);

/* ---- Acks -------------------------------------------------------------------------------- */

typedef struct {
    uint8_t names_vote;   /* 0: the message was unreadable or rate limited (epoch, seq null) */
    uint64_t epoch, seq;
    uint64_t code;
    uint8_t has_receipt;  /* an accepted vote that asked: its place in the poll's chain */
    uint64_t shard, entry;
} vb_ack_entry;

/* Reads the ack payload into at most max entries; returns how many, or VB_E_MALFORMED for
 * anything that is not exactly an ack (VB_E_SPACE if it holds more than max). */
int vb_decode_ack(const uint8_t *ack, size_t len, vb_ack_entry *entries, size_t max);

/* ---- The outbox -------------------------------------------------------------------------- */

/* One stored vote. The caller gives the outbox an array of them (its RAM) and the flash
 * behind it (the callbacks); the outbox owns their contents. */
typedef struct {
    uint8_t used;
    uint64_t epoch, seq;
    char poll[VB_ID_MAX + 1];
    uint16_t len;
    uint8_t payload[VB_VOTE_MAX];
    uint32_t sent_ms;     /* when it last went, by the caller's clock; valid when sent */
    uint8_t sent;
} vb_record;

/* The flash: slot 0 holds the outbox's own state (epoch, next seq), slot i + 1 record i. Each
 * save must be atomic (all of it or none: write a copy, then switch), as the seq rule relies
 * on it. len 0 erases the slot. load returns the slot's length, 0 for an empty slot, or < 0
 * if it cannot be read (the outbox then treats the store as lost). */
typedef struct {
    int (*save)(void *ctx, unsigned slot, const uint8_t *data, size_t len);
    int (*load)(void *ctx, unsigned slot, uint8_t *data, size_t room);
    void *ctx;
} vb_store;

#define VB_SLOT_MAX (40u + VB_ID_MAX + VB_VOTE_MAX) /* bytes a slot needs, at most */

typedef struct {
    vb_record *records;
    unsigned capacity;
    vb_store store;
    uint64_t epoch;       /* the current epoch */
    uint64_t next_seq;    /* the next press's seq: reserved in flash before it is used */
    uint32_t epoch_steps; /* stale_epoch moves so far: the next is 2^steps higher */
    uint32_t hold_until_ms;
    uint8_t holding;
    uint32_t random;      /* for the pause after rate_limited */
} vb_outbox;

/* Loads the outbox from the store, at boot. A store that holds no state (new, or lost) is a
 * new one: its epoch is new_epoch, which must be higher than any epoch this device used
 * before (the Unix time when it has a clock, else a boot counter kept elsewhere: rule 2).
 * Returns the number of votes loaded, or VB_E_STORE. */
int vb_outbox_open(vb_outbox *ob, vb_record *records, unsigned capacity, vb_store store,
                   uint64_t new_epoch, uint32_t seed);

/* A press: takes the next seq, stores the vote in flash, and only then returns (rule 1). The
 * vote's seq and epoch are the outbox's; its other fields are the caller's. Returns the record
 * index, or VB_E_FULL, VB_E_STORE, VB_E_SPACE (too large for VB_VOTE_MAX), VB_E_ARG. */
int vb_outbox_press(vb_outbox *ob, const char *poll, vb_vote *vote);

/* The next message to publish at QoS 1 on "votes/<poll>/" + the device id, now: what is
 * stored and not in flight (or with no ack for VB_RESEND_MS), inside the window (rule 5), up
 * to VB_BATCH_VOTES votes of one poll and VB_MAX_PAYLOAD bytes. Writes the poll id (with its
 * zero) and the payload; returns the payload's length, 0 when nothing is due, or VB_E_SPACE.
 * The votes are marked sent at now_ms: call it again until it returns 0. */
int vb_outbox_next(vb_outbox *ob, uint32_t now_ms, char *poll, size_t poll_room,
                   uint8_t *payload, size_t room);

/* A new connection: everything stored goes again (rule 4). */
void vb_outbox_reconnected(vb_outbox *ob);

/* What an ack did to the outbox, for the caller to show or log. */
typedef void (*vb_settled_fn)(void *ctx, const vb_record *record, const vb_ack_entry *entry);

/* Applies an ack received on "acks/" + the device id: a vote it names leaves the outbox (any
 * code but stale_epoch: rule 3); stale_epoch keeps the vote and stores it again in a higher
 * epoch (rule 2); rate_limited pauses sending 1 to 3 s, then everything goes again. settled
 * (may be NULL) is called for each vote that leaves. Returns the number that left, or
 * VB_E_MALFORMED (the ack is ignored: its votes go again after VB_RESEND_MS) or VB_E_STORE. */
int vb_outbox_ack(vb_outbox *ob, const uint8_t *ack, size_t len, uint32_t now_ms,
                  vb_settled_fn settled, void *ctx);

/* Votes stored and not yet answered (the heartbeat's outbox). */
unsigned vb_outbox_depth(const vb_outbox *ob);

/* The checksum the outbox seals its slots with (FNV-1a, 32 bits), for a port's own copies of
 * a slot (example/button.c keeps two per slot and loads the newest whole one). */
uint32_t vb_checksum(const uint8_t *data, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* VOTEBOX_H */
