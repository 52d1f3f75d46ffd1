/*
 * votebox.c: see votebox.h. C99, no dynamic memory, no library beyond <string.h>.
 *
 * The rules it keeps are docs/protocol.md's, "The device's side of the bargain"; the numbers
 * in comments (rule 1...) are that list's.
 */
#include "votebox.h"

#include <string.h>

/* ---- CBOR heads (RFC 8949, 3.1), shortest form ------------------------------------------ */

#define MAJOR_UINT 0u
#define MAJOR_BYTES 2u
#define MAJOR_TEXT 3u
#define MAJOR_ARRAY 4u
#define MAJOR_MAP 5u
#define CBOR_NULL 0xf6u

/* Appends a head of major type `major` and argument `value` at out[*at]; VB_E_SPACE if it
 * does not fit in room. */
static int put_head(uint8_t *out, size_t room, size_t *at, unsigned major, uint64_t value)
{
    uint8_t head[9];
    size_t n, i;
    if (value < 24u) {
        head[0] = (uint8_t)(major << 5 | (unsigned)value);
        n = 1;
    } else if (value <= 0xffu) {
        head[0] = (uint8_t)(major << 5 | 24u);
        n = 2;
    } else if (value <= 0xffffu) {
        head[0] = (uint8_t)(major << 5 | 25u);
        n = 3;
    } else if (value <= 0xffffffffu) {
        head[0] = (uint8_t)(major << 5 | 26u);
        n = 5;
    } else {
        head[0] = (uint8_t)(major << 5 | 27u);
        n = 9;
    }
    for (i = 1; i < n; i++) {
        head[i] = (uint8_t)(value >> (8u * (unsigned)(n - 1 - i)));
    }
    if (*at > room || room - *at < n) {
        return VB_E_SPACE;
    }
    memcpy(out + *at, head, n);
    *at += n;
    return VB_OK;
}

static int put_bytes(uint8_t *out, size_t room, size_t *at, const uint8_t *data, size_t n)
{
    if (*at > room || room - *at < n) {
        return VB_E_SPACE;
    }
    if (n > 0u) {
        memcpy(out + *at, data, n);
    }
    *at += n;
    return VB_OK;
}

#define TRY(call)                                                                              \
    do {                                                                                       \
        int tried_ = (call);                                                                   \
        if (tried_ < 0) {                                                                      \
            return tried_;                                                                     \
        }                                                                                      \
    } while (0)

/* ---- Encoding ---------------------------------------------------------------------------- */

int vb_encode_vote(const vb_vote *vote, uint8_t *out, size_t room)
{
    size_t at = 0, i, j;
    unsigned pairs = 2;
    if (vote == NULL || out == NULL || vote->n_choices == 0u || vote->n_choices > VB_MAX_CHOICES ||
        vote->seq > VB_MAX_UINT || vote->epoch > VB_MAX_UINT ||
        (vote->has_ts && vote->ts > VB_MAX_UINT) || vote->receipt > 1u) {
        return VB_E_ARG;
    }
    for (i = 0; i < vote->n_choices; i++) {
        if (vote->choice[i] > VB_MAX_UINT) {
            return VB_E_ARG;
        }
        for (j = 0; j < i; j++) {
            if (vote->choice[j] == vote->choice[i]) {
                return VB_E_ARG; /* a choice list holds distinct options */
            }
        }
    }
    if (vote->voter != NULL && (vote->voter_len == 0u || vote->voter_len > VB_MAX_VOTER)) {
        return VB_E_ARG;
    }
    pairs += (vote->has_ts ? 1u : 0u) + (vote->voter != NULL ? 1u : 0u) +
             (vote->epoch > 0u ? 1u : 0u) + (vote->receipt ? 1u : 0u);
    TRY(put_head(out, room, &at, MAJOR_MAP, pairs));
    TRY(put_head(out, room, &at, MAJOR_UINT, 0));
    if (vote->n_choices == 1u && !vote->as_list) {
        TRY(put_head(out, room, &at, MAJOR_UINT, vote->choice[0]));
    } else {
        TRY(put_head(out, room, &at, MAJOR_ARRAY, vote->n_choices));
        for (i = 0; i < vote->n_choices; i++) {
            TRY(put_head(out, room, &at, MAJOR_UINT, vote->choice[i]));
        }
    }
    TRY(put_head(out, room, &at, MAJOR_UINT, 1));
    TRY(put_head(out, room, &at, MAJOR_UINT, vote->seq));
    if (vote->has_ts) {
        TRY(put_head(out, room, &at, MAJOR_UINT, 2));
        TRY(put_head(out, room, &at, MAJOR_UINT, vote->ts));
    }
    if (vote->voter != NULL) {
        TRY(put_head(out, room, &at, MAJOR_UINT, 3));
        TRY(put_head(out, room, &at, MAJOR_BYTES, vote->voter_len));
        TRY(put_bytes(out, room, &at, vote->voter, vote->voter_len));
    }
    if (vote->epoch > 0u) {
        TRY(put_head(out, room, &at, MAJOR_UINT, 4));
        TRY(put_head(out, room, &at, MAJOR_UINT, vote->epoch));
    }
    if (vote->receipt) {
        TRY(put_head(out, room, &at, MAJOR_UINT, 5));
        TRY(put_head(out, room, &at, MAJOR_UINT, 1));
    }
    return (int)at;
}

int vb_encode_batch(const uint8_t *const *votes, const size_t *lengths, size_t n, uint8_t *out,
                    size_t room)
{
    size_t at = 0, i;
    if (votes == NULL || lengths == NULL || out == NULL || n == 0u || n > 256u) {
        return VB_E_ARG;
    }
    TRY(put_head(out, room, &at, MAJOR_ARRAY, n));
    for (i = 0; i < n; i++) {
        TRY(put_bytes(out, room, &at, votes[i], lengths[i]));
    }
    return (int)at;
}

int vb_encode_heartbeat(uint64_t uptime_s, uint64_t outbox, int battery, uint8_t *out,
                        size_t room)
{
    size_t at = 0;
    if (out == NULL || uptime_s > VB_MAX_UINT || outbox > VB_MAX_UINT || battery > 100) {
        return VB_E_ARG;
    }
    TRY(put_head(out, room, &at, MAJOR_MAP, battery >= 0 ? 3u : 2u));
    TRY(put_head(out, room, &at, MAJOR_UINT, 0));
    TRY(put_head(out, room, &at, MAJOR_UINT, uptime_s));
    TRY(put_head(out, room, &at, MAJOR_UINT, 1));
    TRY(put_head(out, room, &at, MAJOR_UINT, outbox));
    if (battery >= 0) {
        TRY(put_head(out, room, &at, MAJOR_UINT, 2));
        TRY(put_head(out, room, &at, MAJOR_UINT, (uint64_t)battery));
    }
    return (int)at;
}

int vb_encode_status(int online, uint8_t *out, size_t room)
{
    const char *text = online ? "online" : "offline";
    size_t at = 0;
    if (out == NULL) {
        return VB_E_ARG;
    }
    TRY(put_bytes(out, room, &at, (const uint8_t *)text, strlen(text)));
    return (int)at;
}

/* ---- Reading CBOR: only what an ack and our own votes hold ------------------------------- */

typedef struct {
    const uint8_t *data;
    size_t len, at;
} reader;

/* Reads a head: its major type and argument. VB_E_MALFORMED past the end, for an
 * indefinite or reserved length, or a simple value other than null (null: *is_null = 1). */
static int get_head(reader *r, unsigned *major, uint64_t *value, int *is_null)
{
    unsigned info, size, i;
    uint8_t first;
    if (r->at >= r->len) {
        return VB_E_MALFORMED;
    }
    first = r->data[r->at++];
    *is_null = first == CBOR_NULL;
    if (*is_null) {
        *major = 7;
        *value = 0;
        return VB_OK;
    }
    *major = first >> 5;
    info = first & 0x1fu;
    if (info < 24u) {
        *value = info;
        return VB_OK;
    }
    if (info > 27u) {
        return VB_E_MALFORMED;
    }
    size = 1u << (info - 24u); /* 1, 2, 4 or 8 bytes */
    if (r->len - r->at < size) {
        return VB_E_MALFORMED;
    }
    *value = 0;
    for (i = 0; i < size; i++) {
        *value = *value << 8 | r->data[r->at++];
    }
    return VB_OK;
}

static int get_uint(reader *r, uint64_t *value, int null_ok, int *is_null)
{
    unsigned major;
    int null_;
    TRY(get_head(r, &major, value, &null_));
    if (is_null != NULL) {
        *is_null = null_;
    }
    if (null_) {
        return null_ok ? VB_OK : VB_E_MALFORMED;
    }
    return major == MAJOR_UINT ? VB_OK : VB_E_MALFORMED;
}

/* One entry of an ack: [epoch, seq, code] or [epoch, seq, code, shard, entry]. */
static int get_ack_entry(reader *r, vb_ack_entry *e)
{
    unsigned major;
    uint64_t size;
    int null_, epoch_null, seq_null;
    TRY(get_head(r, &major, &size, &null_));
    if (null_ || major != MAJOR_ARRAY || (size != 3u && size != 5u)) {
        return VB_E_MALFORMED;
    }
    TRY(get_uint(r, &e->epoch, 1, &epoch_null));
    TRY(get_uint(r, &e->seq, 1, &seq_null));
    if (epoch_null != seq_null) {
        return VB_E_MALFORMED; /* the processor names a vote by both, or neither */
    }
    e->names_vote = (uint8_t)!epoch_null;
    TRY(get_uint(r, &e->code, 0, NULL));
    e->has_receipt = size == 5u;
    e->shard = e->entry = 0;
    if (e->has_receipt) {
        TRY(get_uint(r, &e->shard, 0, NULL));
        TRY(get_uint(r, &e->entry, 0, NULL));
    }
    return VB_OK;
}

/* The ack's entry count, once every byte of it has been checked. */
static int check_ack(const uint8_t *ack, size_t len, uint64_t *count)
{
    reader r;
    unsigned major;
    uint64_t i;
    int null_;
    vb_ack_entry scratch;
    if (ack == NULL) {
        return VB_E_MALFORMED;
    }
    r.data = ack;
    r.len = len;
    r.at = 0;
    TRY(get_head(&r, &major, count, &null_));
    /* Each entry takes 4 bytes at least: a count beyond that is a lie, not a loop to run. */
    if (null_ || major != MAJOR_ARRAY || *count > (len - r.at) / 4u) {
        return VB_E_MALFORMED;
    }
    for (i = 0; i < *count; i++) {
        TRY(get_ack_entry(&r, &scratch));
    }
    return r.at == len ? VB_OK : VB_E_MALFORMED; /* nothing after the ack */
}

int vb_decode_ack(const uint8_t *ack, size_t len, vb_ack_entry *entries, size_t max)
{
    reader r;
    unsigned major;
    uint64_t count, i;
    int null_;
    TRY(check_ack(ack, len, &count));
    if (count > max || (entries == NULL && count > 0u)) {
        return VB_E_SPACE;
    }
    r.data = ack;
    r.len = len;
    r.at = 0;
    TRY(get_head(&r, &major, &count, &null_));
    for (i = 0; i < count; i++) {
        TRY(get_ack_entry(&r, &entries[i]));
    }
    return (int)count;
}

/* Reads back a vote vb_encode_vote wrote (the outbox's own bytes), into *vote, whose voter
 * then points into data. */
static int parse_vote(const uint8_t *data, size_t len, vb_vote *vote)
{
    reader r;
    unsigned major, k;
    uint64_t pairs, key, value, i;
    int null_;
    r.data = data;
    r.len = len;
    r.at = 0;
    memset(vote, 0, sizeof *vote);
    TRY(get_head(&r, &major, &pairs, &null_));
    if (null_ || major != MAJOR_MAP || pairs > 6u) {
        return VB_E_MALFORMED;
    }
    for (k = 0; k < pairs; k++) {
        TRY(get_uint(&r, &key, 0, NULL));
        TRY(get_head(&r, &major, &value, &null_));
        if (null_) {
            return VB_E_MALFORMED;
        }
        if (key == 0u && major == MAJOR_ARRAY) {
            if (value == 0u || value > VB_MAX_CHOICES) {
                return VB_E_MALFORMED;
            }
            vote->n_choices = (uint8_t)value;
            vote->as_list = 1;
            for (i = 0; i < value; i++) {
                TRY(get_uint(&r, &vote->choice[i], 0, NULL));
            }
        } else if (key == 3u && major == MAJOR_BYTES) {
            if (value == 0u || value > VB_MAX_VOTER || r.len - r.at < value) {
                return VB_E_MALFORMED;
            }
            vote->voter = r.data + r.at;
            vote->voter_len = (uint8_t)value;
            r.at += (size_t)value;
        } else if (major == MAJOR_UINT && key <= 5u) {
            switch ((unsigned)key) {
            case 0: vote->choice[0] = value; vote->n_choices = 1; break;
            case 1: vote->seq = value; break;
            case 2: vote->ts = value; vote->has_ts = 1; break;
            case 4: vote->epoch = value; break;
            case 5: vote->receipt = value == 1u; break;
            default: return VB_E_MALFORMED;
            }
        } else {
            return VB_E_MALFORMED;
        }
    }
    return r.at == len && vote->n_choices > 0u ? VB_OK : VB_E_MALFORMED;
}

/* ---- The outbox's flash: slots with a magic, their fields, and a checksum ---------------- */

static const uint8_t STATE_MAGIC[4] = {'V', 'B', 'S', '1'};
static const uint8_t RECORD_MAGIC[4] = {'V', 'B', 'R', '1'};

static void put_u64(uint8_t *p, uint64_t v)
{
    unsigned i;
    for (i = 0; i < 8u; i++) {
        p[i] = (uint8_t)(v >> (56u - 8u * i));
    }
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    unsigned i;
    for (i = 0; i < 8u; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

/* FNV-1a: a torn or worn slot reads as empty, not as a vote with another seq. */
uint32_t vb_checksum(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) {
        h = (h ^ p[i]) * 16777619u;
    }
    return h;
}

static size_t seal(uint8_t *slot, size_t n)
{
    uint32_t sum = vb_checksum(slot, n);
    slot[n] = (uint8_t)(sum >> 24);
    slot[n + 1] = (uint8_t)(sum >> 16);
    slot[n + 2] = (uint8_t)(sum >> 8);
    slot[n + 3] = (uint8_t)sum;
    return n + 4;
}

static int sealed(const uint8_t *slot, int n)
{
    uint32_t sum;
    if (n < 8) {
        return 0;
    }
    sum = (uint32_t)slot[n - 4] << 24 | (uint32_t)slot[n - 3] << 16 |
          (uint32_t)slot[n - 2] << 8 | slot[n - 1];
    return vb_checksum(slot, (size_t)n - 4u) == sum;
}

static int save_state(vb_outbox *ob)
{
    uint8_t slot[28];
    memcpy(slot, STATE_MAGIC, 4);
    put_u64(slot + 4, ob->epoch);
    put_u64(slot + 12, ob->next_seq);
    slot[20] = (uint8_t)(ob->epoch_steps >> 24);
    slot[21] = (uint8_t)(ob->epoch_steps >> 16);
    slot[22] = (uint8_t)(ob->epoch_steps >> 8);
    slot[23] = (uint8_t)ob->epoch_steps;
    return ob->store.save(ob->store.ctx, 0, slot, seal(slot, 24)) == 0 ? VB_OK : VB_E_STORE;
}

static int save_record(vb_outbox *ob, unsigned index, const vb_record *rec)
{
    uint8_t slot[VB_SLOT_MAX];
    size_t n = strlen(rec->poll);
    memcpy(slot, RECORD_MAGIC, 4);
    put_u64(slot + 4, rec->epoch);
    put_u64(slot + 12, rec->seq);
    slot[20] = (uint8_t)n;
    memcpy(slot + 21, rec->poll, n);
    slot[21 + n] = (uint8_t)(rec->len >> 8);
    slot[22 + n] = (uint8_t)rec->len;
    memcpy(slot + 23 + n, rec->payload, rec->len);
    n = seal(slot, 23 + n + rec->len);
    return ob->store.save(ob->store.ctx, index + 1u, slot, n) == 0 ? VB_OK : VB_E_STORE;
}

static int erase_record(vb_outbox *ob, unsigned index)
{
    return ob->store.save(ob->store.ctx, index + 1u, NULL, 0) == 0 ? VB_OK : VB_E_STORE;
}

static int valid_id(const char *id)
{
    size_t i, n;
    if (id == NULL) {
        return 0;
    }
    n = strlen(id);
    if (n == 0u || n > VB_ID_MAX) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        char c = id[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-')) {
            return 0;
        }
    }
    return 1;
}

/* Reads record slot `index` into ob->records[index]; 1 if it holds a vote. */
static int load_record(vb_outbox *ob, unsigned index)
{
    uint8_t slot[VB_SLOT_MAX];
    vb_record *rec = &ob->records[index];
    vb_vote check;
    int n = ob->store.load(ob->store.ctx, index + 1u, slot, sizeof slot);
    size_t poll_len, len;
    memset(rec, 0, sizeof *rec);
    if (n <= 0 || n > (int)sizeof slot || !sealed(slot, n) || memcmp(slot, RECORD_MAGIC, 4) != 0) {
        return 0;
    }
    poll_len = slot[20];
    if (poll_len == 0u || poll_len > VB_ID_MAX || (size_t)n < 27u + poll_len) {
        return 0;
    }
    len = (size_t)slot[21 + poll_len] << 8 | slot[22 + poll_len];
    if (len == 0u || len > VB_VOTE_MAX || (size_t)n != 27u + poll_len + len) {
        return 0;
    }
    rec->epoch = get_u64(slot + 4);
    rec->seq = get_u64(slot + 12);
    memcpy(rec->poll, slot + 21, poll_len);
    rec->poll[poll_len] = '\0';
    rec->len = (uint16_t)len;
    memcpy(rec->payload, slot + 23 + poll_len, len);
    if (!valid_id(rec->poll) || parse_vote(rec->payload, rec->len, &check) != VB_OK) {
        memset(rec, 0, sizeof *rec);
        return 0;
    }
    rec->used = 1;
    return 1;
}

/* ---- The outbox -------------------------------------------------------------------------- */

static uint32_t next_random(vb_outbox *ob)
{
    /* xorshift32: only for the pause after rate_limited, so devices do not move in step. */
    uint32_t x = ob->random ? ob->random : 2463534242u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    ob->random = x;
    return x;
}

int vb_outbox_open(vb_outbox *ob, vb_record *records, unsigned capacity, vb_store store,
                   uint64_t new_epoch, uint32_t seed)
{
    uint8_t slot[28];
    unsigned i;
    int n, loaded = 0, fresh;
    uint64_t highest_epoch = 0;
    if (ob == NULL || records == NULL || capacity == 0u || store.save == NULL ||
        store.load == NULL || new_epoch > VB_MAX_UINT) {
        return VB_E_ARG;
    }
    memset(ob, 0, sizeof *ob);
    ob->records = records;
    ob->capacity = capacity;
    ob->store = store;
    ob->random = seed;
    n = store.load(store.ctx, 0, slot, sizeof slot);
    fresh = !(n == 28 && sealed(slot, n) && memcmp(slot, STATE_MAGIC, 4) == 0);
    if (!fresh) {
        ob->epoch = get_u64(slot + 4);
        ob->next_seq = get_u64(slot + 12);
        ob->epoch_steps = (uint32_t)slot[20] << 24 | (uint32_t)slot[21] << 16 |
                          (uint32_t)slot[22] << 8 | slot[23];
    }
    for (i = 0; i < capacity; i++) {
        if (load_record(ob, i)) {
            loaded++;
            if (records[i].epoch > highest_epoch) {
                highest_epoch = records[i].epoch;
            }
            /* A seq stored in the current epoch is never handed out again. */
            if (!fresh && records[i].epoch == ob->epoch && records[i].seq >= ob->next_seq) {
                ob->next_seq = records[i].seq + 1u;
            }
        }
    }
    if (fresh) {
        /* Rule 2: a lost store is a new epoch, above every epoch still stored, whose seqs
         * start again. Votes that survive keep their own epoch and seq, and go out. */
        ob->epoch = new_epoch > highest_epoch ? new_epoch : highest_epoch + 1u;
        ob->next_seq = 1;
        ob->epoch_steps = 0;
        TRY(save_state(ob));
    }
    return loaded;
}

int vb_outbox_press(vb_outbox *ob, const char *poll, vb_vote *vote)
{
    uint8_t payload[VB_VOTE_MAX];
    unsigned i, slot = 0;
    int len, found = 0;
    if (ob == NULL || vote == NULL || !valid_id(poll)) {
        return VB_E_ARG;
    }
    for (i = 0; i < ob->capacity && !found; i++) {
        if (!ob->records[i].used) {
            slot = i;
            found = 1;
        }
    }
    if (!found) {
        return VB_E_FULL;
    }
    if (ob->next_seq > VB_MAX_UINT) {
        return VB_E_ARG;
    }
    vote->seq = ob->next_seq;
    vote->epoch = ob->epoch;
    len = vb_encode_vote(vote, payload, sizeof payload);
    if (len < 0) {
        return len; /* nothing stored, no seq spent */
    }
    /* Rule 1: the seq is reserved in flash first. If the power fails before the vote is
     * stored, the seq is lost, never given to another vote of this epoch. */
    ob->next_seq++;
    if (save_state(ob) != VB_OK) {
        ob->next_seq--;
        return VB_E_STORE;
    }
    {
        vb_record *rec = &ob->records[slot];
        vb_record fresh;
        memset(&fresh, 0, sizeof fresh);
        fresh.epoch = vote->epoch;
        fresh.seq = vote->seq;
        memcpy(fresh.poll, poll, strlen(poll) + 1u);
        fresh.len = (uint16_t)len;
        memcpy(fresh.payload, payload, (size_t)len);
        TRY(save_record(ob, slot, &fresh));
        *rec = fresh;
        rec->used = 1;
    }
    return (int)slot;
}

/* The lowest seq still stored in `epoch`: rule 5's window starts there. */
static uint64_t oldest_seq(const vb_outbox *ob, uint64_t epoch)
{
    uint64_t oldest = UINT64_MAX;
    unsigned i;
    for (i = 0; i < ob->capacity; i++) {
        const vb_record *r = &ob->records[i];
        if (r->used && r->epoch == epoch && r->seq < oldest) {
            oldest = r->seq;
        }
    }
    return oldest;
}

/* Each epoch's oldest seq, for the few epochs an outbox holds at once (one, two after a
 * stale_epoch); an epoch beyond them is looked up each time. */
#define EPOCHS_KEPT 4u
typedef struct {
    uint64_t epoch[EPOCHS_KEPT], oldest[EPOCHS_KEPT];
    unsigned n;
} oldest_table;

static uint64_t oldest_in(const vb_outbox *ob, oldest_table *t, uint64_t epoch)
{
    unsigned i;
    for (i = 0; i < t->n; i++) {
        if (t->epoch[i] == epoch) {
            return t->oldest[i];
        }
    }
    if (t->n == EPOCHS_KEPT) {
        return oldest_seq(ob, epoch);
    }
    t->epoch[t->n] = epoch;
    t->oldest[t->n] = oldest_seq(ob, epoch);
    return t->oldest[t->n++];
}

static int due(const vb_outbox *ob, oldest_table *t, const vb_record *r, uint32_t now_ms)
{
    if (!r->used || (r->sent && (int32_t)(now_ms - r->sent_ms) < (int32_t)VB_RESEND_MS)) {
        return 0;
    }
    return r->seq - oldest_in(ob, t, r->epoch) < VB_WINDOW;
}

static int before(const vb_record *a, const vb_record *b)
{
    return a->epoch < b->epoch || (a->epoch == b->epoch && a->seq < b->seq);
}

int vb_outbox_next(vb_outbox *ob, uint32_t now_ms, char *poll, size_t poll_room,
                   uint8_t *payload, size_t room)
{
    uint16_t chosen[VB_BATCH_VOTES];
    unsigned n = 0, i, k;
    size_t bytes = 3, at = 0; /* a batch's head: 3 bytes at most */
    oldest_table oldest;
    if (ob == NULL || poll == NULL || payload == NULL || ob->capacity > 65535u) {
        return VB_E_ARG;
    }
    if (ob->holding) {
        if ((int32_t)(now_ms - ob->hold_until_ms) < 0) {
            return 0;
        }
        ob->holding = 0;
    }
    oldest.n = 0;
    /* The oldest due votes first, those of the first one's poll, while they fit. Each pass
     * takes the lowest (epoch, seq) above the last one taken: (epoch, seq) names one vote. */
    while (n < VB_BATCH_VOTES) {
        int best = -1;
        for (i = 0; i < ob->capacity; i++) {
            const vb_record *r = &ob->records[i];
            if (!due(ob, &oldest, r, now_ms) ||
                (n > 0u && (!before(&ob->records[chosen[n - 1u]], r) ||
                            strcmp(r->poll, ob->records[chosen[0]].poll) != 0))) {
                continue;
            }
            if (best < 0 || before(r, &ob->records[best])) {
                best = (int)i;
            }
        }
        if (best < 0 || bytes + ob->records[best].len > VB_MAX_PAYLOAD) {
            break;
        }
        bytes += ob->records[best].len;
        chosen[n++] = (uint16_t)best;
    }
    if (n == 0u) {
        return 0;
    }
    if (strlen(ob->records[chosen[0]].poll) + 1u > poll_room) {
        return VB_E_SPACE;
    }
    if (n == 1u) {
        TRY(put_bytes(payload, room, &at, ob->records[chosen[0]].payload,
                      ob->records[chosen[0]].len));
    } else {
        TRY(put_head(payload, room, &at, MAJOR_ARRAY, n));
        for (k = 0; k < n; k++) {
            TRY(put_bytes(payload, room, &at, ob->records[chosen[k]].payload,
                          ob->records[chosen[k]].len));
        }
    }
    memcpy(poll, ob->records[chosen[0]].poll, strlen(ob->records[chosen[0]].poll) + 1u);
    for (k = 0; k < n; k++) { /* written: now they are in flight */
        ob->records[chosen[k]].sent = 1;
        ob->records[chosen[k]].sent_ms = now_ms;
    }
    return (int)at;
}

void vb_outbox_reconnected(vb_outbox *ob)
{
    unsigned i;
    if (ob == NULL) {
        return;
    }
    for (i = 0; i < ob->capacity; i++) {
        ob->records[i].sent = 0;
    }
}

/* Rule 2: a vote answered stale_epoch is stored again under a new seq of the current epoch;
 * when it was of the current epoch, the outbox first moves to a higher one (1, 2, 4... above,
 * doubling, so a clock far ahead is passed in few steps). */
static int store_again(vb_outbox *ob, unsigned index)
{
    vb_record *rec = &ob->records[index];
    vb_record moved = *rec;
    vb_vote vote;
    int len;
    if (parse_vote(rec->payload, rec->len, &vote) != VB_OK) {
        return VB_E_MALFORMED;
    }
    {
        /* The new epoch (if any) and the seq it reserves go to flash in one write. */
        vb_outbox before = *ob;
        if (rec->epoch == ob->epoch) {
            uint32_t step = ob->epoch_steps < 52u ? ob->epoch_steps : 52u;
            if (ob->epoch + (1ull << step) > VB_MAX_UINT) {
                return VB_E_ARG;
            }
            ob->epoch += 1ull << step;
            ob->epoch_steps++;
            ob->next_seq = 1;
        }
        vote.seq = ob->next_seq;
        vote.epoch = ob->epoch;
        len = vb_encode_vote(&vote, moved.payload, sizeof moved.payload);
        if (len >= 0) {
            ob->next_seq++;
            len = save_state(ob) == VB_OK ? len : VB_E_STORE;
        }
        if (len < 0) {
            *ob = before; /* nothing stored: the outbox as it was */
            return len;
        }
    }
    moved.epoch = vote.epoch;
    moved.seq = vote.seq;
    moved.len = (uint16_t)len;
    moved.sent = 0;
    TRY(save_record(ob, index, &moved)); /* one atomic write: the old vote or the new */
    *rec = moved;
    return VB_OK;
}

int vb_outbox_ack(vb_outbox *ob, const uint8_t *ack, size_t len, uint32_t now_ms,
                  vb_settled_fn settled, void *ctx)
{
    reader r;
    unsigned major, i;
    uint64_t count, e;
    int null_, left = 0;
    if (ob == NULL) {
        return VB_E_ARG;
    }
    /* The whole ack is checked before anything is done with it. */
    TRY(check_ack(ack, len, &count));
    r.data = ack;
    r.len = len;
    r.at = 0;
    TRY(get_head(&r, &major, &count, &null_));
    for (e = 0; e < count; e++) {
        vb_ack_entry entry;
        TRY(get_ack_entry(&r, &entry));
        if (!entry.names_vote) {
            if (entry.code == VB_RATE_LIMITED) {
                /* Which votes were refused is unknown: pause 1 to 3 s, then all go again. */
                ob->holding = 1;
                ob->hold_until_ms = now_ms + 1000u + next_random(ob) % 2000u;
                vb_outbox_reconnected(ob);
            }
            continue; /* an unreadable message: its votes go again after VB_RESEND_MS */
        }
        for (i = 0; i < ob->capacity; i++) {
            vb_record *rec = &ob->records[i];
            if (!rec->used || rec->epoch != entry.epoch || rec->seq != entry.seq) {
                continue;
            }
            if (entry.code == VB_STALE_EPOCH) {
                int moved = store_again(ob, i);
                if (moved == VB_E_STORE) {
                    return VB_E_STORE;
                }
                if (moved != VB_OK) { /* cannot be stored again: final, as any other code */
                    TRY(erase_record(ob, i));
                    rec->used = 0;
                    left++;
                }
                break;
            }
            TRY(erase_record(ob, i));
            if (settled != NULL) {
                settled(ctx, rec, &entry);
            }
            rec->used = 0;
            left++;
            break;
        }
    }
    return left;
}

unsigned vb_outbox_depth(const vb_outbox *ob)
{
    unsigned i, n = 0;
    if (ob == NULL) {
        return 0;
    }
    for (i = 0; i < ob->capacity; i++) {
        n += ob->records[i].used;
    }
    return n;
}
