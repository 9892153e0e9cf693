/*
 * xm_internal.h - what the C files of the store share and nobody else sees: the store handle,
 * the LMDB return-code mapping, the live-map scan and the hot-path prologue/epilogue.
 */
#ifndef SNAPDISK_XM_INTERNAL_H
#define SNAPDISK_XM_INTERNAL_H

#define _GNU_SOURCE
#include <lmdb.h>
#include <pthread.h>
#include <time.h>
#include <sys/types.h>

#include "xm.h"

#define RTXN_POOL 64   /* reset read transactions kept for the hot path */
#define BATCH 256      /* map records a hot-path call decodes at a time */
#define RMW_LOCKS 64   /* stripes of the pool seam's read-modify-write lock */

/* Encrypted volumes (xm_crypt.c): key slot states, as xm_vol_key_state returns them. */
typedef struct xm_keyslot xm_keyslot;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX; /* OpenSSL's, as <openssl/types.h> has it */
/* One block of the group-commit overlay (xm_batch.c): vol's block lba lives at pbn, born in
 * epoch birth, not yet in LIVE.  Slots of an open-addressing hash on (vol, lba). */
typedef struct {
    uint64_t lba;
    uint64_t pbn;
    uint64_t birth;
    uint64_t seq;  /* publication order: a batch takes the entries its fdatasync covered */
    uint32_t vol;
    uint8_t used;
    uint8_t taken; /* applied by the write transaction in progress (st->ov_txn) */
    uint8_t grow;  /* the block was a hole (its apply adds one to live_blocks) */
    uint8_t release; /* the record it replaces was SHARED and born after the newest snapshot
                      * when it was written: its apply releases that block (REFS), no dead
                      * record (xm_row_overlay_c) */
} ov_ent;

#define OV_MAX_DEFAULT 32768   /* overlay blocks before a writer applies the batch itself */
#define WB_KICK_NS 250000000u /* the committer starts the pool's writeback this often (if written) */
#define OV_INTERVAL_US 250000  /* a batch is due when its oldest entry is this old (or at ov_max / 2) */
#define RESV_BLOCKS 4096       /* blocks reserved at a time for redirected writes */
#define RESV_RUNS 64
#define HELD_RUNS 1024         /* runs of st->held (xm_resv.c) */
#define HELD_REBUILD 16        /* st->held is rebuilt exactly every this many reservations */

typedef struct {
    uint64_t pbn, len;
} xm_run;

typedef struct {
    uint64_t size_bytes;
    uint64_t max_snap;
    int known;
    int writable;
} volcfg;

struct xm_store {
    MDB_env *env;
    MDB_dbi dbi[XM_DB_COUNT];
    int pool_fd;
    dev_t dev;
    ino_t ino;
    /* LMDB's map, to check that a value LMDB hands out lies inside it before anyone reads it
     * (a damaged page can carry any size).  With MDB_WRITEMAP every page, dirty ones included,
     * lives in the map.  Changed only by xm_set_mapsize, with no transaction active. */
    const uint8_t *map_addr;
    uint64_t map_size;
    pthread_rwlock_t gate;
    pthread_mutex_t mu; /* guards rtxn[] */
    MDB_txn *rtxn[RTXN_POOL];
    int nrtxn;
    /* Partial-block writes are read-modify-write: two of them on one block must not interleave
     * (two NBD writes to different bytes of a block may run at once). */
    pthread_mutex_t rmw[RMW_LOCKS];
    volcfg *vols; /* indexed by volume id; resized only with the gate closed */
    uint32_t nvols;
    xm_stats stats;
    /* xm_space.c: data.mdb's blocks allocated ahead of LMDB's use (guarded by space_mu) */
    pthread_mutex_t space_mu;
    uint64_t space_psize, space_ahead, space_reserved;
    int space_low, space_nofalloc;
    /* Encrypted volumes (xm_crypt.c): a key slot per volume id; changed only with the gate
     * closed, freed and cleansed by xm_crypt_close (called from xm_close). */
    xm_keyslot *keys;
    uint32_t nkeys;
    /* ---- group commit (xm_batch.c); ov_* and resv* are guarded by ov_mu ---- */
    pthread_mutex_t ov_mu;
    pthread_cond_t ov_cv;      /* inflight reached 0, a foreign transaction ended */
    pthread_cond_t cm_cv;      /* the committer: stop, or its interval changed */
    pthread_mutex_t apply_mu;  /* one batch applier at a time (and xm_set_mapsize) */
    ov_ent *ov;                /* ov_slots slots */
    ov_ent *ov_spare;          /* ov_slots / 2: ov_settle's copy (so it cannot fail) */
    ov_ent *ov_prev;           /* superseded entries, oldest first (xm_batch.c), ov_prev_cap */
    uint32_t ov_nprev, ov_prev_cap;
    uint32_t ov_slots, ov_max, ov_count, ov_inflight;
    uint64_t ov_first_ns;      /* when the oldest pending entry was published (about) */
    uint32_t ov_ntaken;        /* entries marked taken (take_upto), until the settle */
    uint64_t ov_gen;           /* bumped by every commit that changed the live map */
    uint64_t ov_seq;           /* entries published so far */
    uint64_t synced_seq;       /* entries up to this one have their data fdatasync()ed */
    int ov_foreign;            /* a write transaction other than a batch is open */
    int ov_busy;               /* entries are taken: the next transaction waits for the settle */
    MDB_txn *ov_txn;           /* the transaction holding the taken entries */
    xm_extent resv[RESV_RUNS]; /* reserved free runs (lba unused): still FREE in LMDB */
    size_t nresv;
    uint64_t resv_blocks;
    xm_run resv_made[RESV_RUNS]; /* the current reservation's runs as reserve() made them */
    size_t nresv_made;
    xm_run held[HELD_RUNS];    /* sorted, disjoint: a superset of the overlay's blocks (xm_resv.c) */
    size_t nheld;
    int held_valid;            /* 0: the next reservation rebuilds held exactly */
    unsigned held_age;         /* reservations since held was rebuilt exactly */
    int batch_err;             /* the committer's last failure, reported by xm_sync */
    uint64_t commits;          /* LMDB write commits so far (atomic; xm_env_sync) */
    uint64_t synced_commits;   /* commits made durable by xm_env_sync (sync_mu) */
    pthread_mutex_t sync_mu;   /* one xm_env_sync at a time */
    pthread_mutex_t punch_mu;  /* the punch guard (xm_pool.c): punch_holds, punch_cv */
    pthread_cond_t punch_cv;
    int punch_holds;
    int unsafe;                /* XM_OPEN_UNSAFE_NOSYNC */
    uint64_t interval_us;
    pthread_t committer;
    int committer_on, stop;
    /* issue 9 item 3: snapshots waiting for LMDB's writer lock (atomic); a batch
     * being applied stops at its next chunk and commits what it has (xm_batch.c) */
    int snap_want;
    /* xm_drop.c: blocks a batch moved to dead lists, whose cached pages are dropped
     * (drop_q and drop_n guarded by drop_mu, taken after ov_mu if both) */
    pthread_mutex_t drop_mu;
    pthread_cond_t drop_cv;
    xm_run *drop_q;
    size_t drop_n;
    int drop_on, drop_stop;
    pthread_t drop_thr;
};
/* the committer's batch, which a snapshot's snap_want stops early (xm_batch.c) */
int xm_batch_commit_preemptible(xm_store *st);
/* a snapshot's write transaction (xm_batch_life.c): 1 if this thread's next one must
 * leave the overlay alone (then cleared), and its begin */
int xm_batch_keep_taken(xm_store *st);
/* Wait until no snapshot is being taken (a writer about to apply the batch itself). */
void xm_batch_wait_snapshots(xm_store *st);
int xm_wtxn_begin_keep(xm_store *st, MDB_txn **out);
/* xm_drop.c: start and stop the thread (xm_batch_init, xm_batch_fini), queue a block that
 * left the live map for a snapshot's dead list (xm_row_overlay_c), and wake the thread once
 * the batch is done (ov_settle) */
void xm_drop_init(xm_store *st);
void xm_drop_fini(xm_store *st);
void xm_drop_add(xm_store *st, uint64_t pbn, uint64_t len);
void xm_drop_kick(xm_store *st);
/* COUNTERS deltas summed in memory over a batch (xm_row.c): one get and put per
 * (vol, death, birth) key at the flush instead of one per dead record. */
#define XM_ROW_COUNTERS 32
typedef struct {
    size_t n;
    struct { uint32_t vol; uint64_t death, birth, add; } k[XM_ROW_COUNTERS];
} xm_row_counters;
struct bk_chunk; /* xm_bulk.h */
/* rel: the run's entries replace SHARED records no snapshot held when they were written
 * (ov_ent.release): those parts are released through rel (allocator.release's twin), not
 * kept as dead records; NULL: every covered part becomes a dead record. */
int xm_row_overlay_c(xm_store *st, MDB_txn *t, MDB_cursor *c, uint32_t vol, xm_volstate *vs,
                     const xm_extent *nw, xm_row_counters *cnt, struct bk_chunk *rel);
int xm_row_counters_flush(xm_store *st, MDB_txn *t, xm_row_counters *cnt);

struct xm_txn {
    xm_store *st;
    MDB_txn *txn;
    int write; /* began with xm_wtxn_begin: xm_wtxn_end (which calls xm_space_after_commit)
                * after the commit or abort */
};

struct xm_cur {
    xm_store *st;
    MDB_cursor *cur;
};

/* xm_write_row, and *moved = 1 if it redirected any block (0: all in place) */
int xm_write_row_ex(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf,
                    int *moved);
#define STAT_ADD(st, field, n) __atomic_fetch_add(&(st)->stats.field, (n), __ATOMIC_RELAXED)

/* An LMDB return code as the C core's: not-found, map-full and damage get XM_ codes; the
 * rest (errnos, other MDB_ codes) pass through. */
static inline int xm_rc(int rc)
{
    switch (rc) {
    case MDB_NOTFOUND: return XM_ENOTFOUND;
    case MDB_MAP_FULL: return XM_EMAPFULL;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND: return XM_ECORRUPT;
    default: return rc;
    }
}

/* 1 if [data, data+len) lies inside LMDB's map (see map_addr). */
/* CLOCK_MONOTONIC in nanoseconds (the committer's clock: its condition variable uses it). */
static inline uint64_t xm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline int xm_in_map(const xm_store *st, const void *data, size_t len)
{
    const uint8_t *p = data;
    return p >= st->map_addr && len <= st->map_size && (uint64_t)(p - st->map_addr) <= st->map_size - len;
}

/* A read transaction from the store's pool (renewed), and back (reset) (xm_env.c). */
int xm_rtxn_get(xm_store *st, MDB_txn **out);
void xm_rtxn_put(xm_store *st, MDB_txn *t);

/* Records of vol overlapping [lo, hi), in order, at most cap (xm_kv.c); *more is set when the cap
 * cut the list short (the caller then continues from the end of the last record). */
int xm_scan_live(xm_store *st, MDB_cursor *c, uint32_t vol, uint64_t lo, uint64_t hi,
                 xm_extent *out, size_t cap, size_t *nout, int *more);

/* Records of snapshot epoch's view of vol overlapping [lo, hi), sorted by lba, not clipped
 * (extmap.view_at; xm_kv.c); *out is malloc'ed.  nops, if not NULL, counts the database steps
 * (the clone's counted-work tests). */
int xm_snap_view(xm_store *st, MDB_txn *t, uint32_t vol, uint64_t epoch, uint64_t lo,
                 uint64_t hi, xm_extent **out, size_t *n, uint64_t *nops);

/* ---- group commit (xm_batch.c) ------------------------------------------------------------ */

/* The overlay blocks of vol in [lo, hi), sorted by lba (hit[i]: lba, pbn, birth, len 1).
 * Looked up before the read transaction is taken: an entry leaves the overlay only after the
 * commit that put it in LIVE, so a block is found in one or the other. */
typedef struct {
    uint64_t gen;  /* st->ov_gen at the lookup */
    size_t n;
    xm_extent *hit;
    xm_extent local[8];
    int for_write; /* wait for foreign write transactions to end first */
} xm_ovhits;

int xm_batch_init(xm_store *st);
void xm_batch_fini(xm_store *st);  /* stops the committer and applies what is left */
int xm_ov_lookup(xm_store *st, uint32_t vol, uint64_t lo, uint64_t hi, xm_ovhits *h);
void xm_ov_free(xm_ovhits *h);
/* Reserve need blocks for a redirected write (runs into out[], cap), counted in flight until
 * xm_ov_insert or xm_ov_discard. */
int xm_ov_alloc(xm_store *st, uint64_t need, xm_extent *out, size_t cap, size_t *nout);
/* Publish n blocks (lba..., pbn from runs) of vol born birth; XM_EAGAIN_ROW if the map changed
 * since the lookup (h->gen) or a block got an entry meanwhile: nothing published, retry.  A
 * block whose entry is born at or before max_snap (it survived a snapshot) supersedes it: the
 * old entry moves to ov_prev; XM_EAGAIN_ROW + 1 if that has no room (apply the batch first). */
int xm_ov_insert(xm_store *st, uint32_t vol, const xm_extent *blocks, size_t n, uint64_t birth,
                 uint64_t max_snap,
                 uint64_t gen, const xm_extent *runs, size_t nruns, const xm_extent *recs,
                 size_t nrecs);
/* A reserved allocation not published after all: its runs go back to the reservation. */
void xm_ov_discard(xm_store *st, const xm_extent *runs, size_t n);
/* With ov_mu: one redirect fewer between xm_ov_alloc and its end; unpublished runs back to the
 * reservation (xm_resv.c). */
void xm_ov_inflight_done(xm_store *st);
void xm_ov_give_back(xm_store *st, const xm_extent *runs, size_t n);
/* FREE edits of a batch's claims (xm_resv.c): insert a run (coalescing), take one out. */
int xm_free_insert(xm_store *st, MDB_txn *t, uint64_t pbn, uint64_t len);
int xm_free_take(xm_store *st, MDB_txn *t, uint64_t pbn, uint64_t len);
int xm_ov_full(xm_store *st, uint64_t need); /* 1 if need more blocks would pass the bound */
/* Make sure the reservation holds need blocks (called outside the gate: it may wait for
 * LMDB's writer lock). */
int xm_ov_ensure(xm_store *st, uint64_t need);
#define XM_EAGAIN_ROW -30980

/* Every LMDB write transaction other than a batch's begins here: the overlay is applied in it
 * first (data fdatasync()ed before), and xm_wtxn_end(committed) settles the overlay after the
 * commit or abort. */
int xm_wtxn_begin(xm_store *st, MDB_txn **out);
void xm_wtxn_end(xm_store *st, int committed);
/* After every successful mdb_txn_commit of a write transaction (xm_env.c's count). */
void xm_commit_done(xm_store *st);
/* fdatasync the pool, covering every overlay entry published so far (xm_batch.c). */
int xm_batch_sync_data(xm_store *st);
/* Before a Python read transaction: apply the overlay, so that what Python reads of the map
 * (LIVE, counters, usage, check) includes the redirected writes.  Skipped while a foreign
 * write transaction is open (it applies the overlay itself, and may be this thread's). */
int xm_batch_before_read(xm_store *st);

/* xm_row.c's pieces the batch applier reuses. */
int xm_row_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
                     const uint8_t **out);
int xm_row_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl);
int xm_row_meta_get2(xm_store *st, MDB_txn *t, const char *name, uint64_t out[2]);
int xm_row_meta_put2(xm_store *st, MDB_txn *t, const char *name, const uint64_t v[2]);
int xm_row_free_run(const xm_store *st, const MDB_val *k, const MDB_val *v, uint64_t *pbn,
                    uint64_t *len);

/* ---- the hot-path prologue and epilogue (xm_io.c) -------------------------------------- */

/* What a hot-path call holds between xm_io_begin and xm_io_end. */
typedef struct {
    xm_store *st;
    MDB_txn *txn;     /* a pooled read transaction, or the write transaction of xm_write_row */
    MDB_cursor *live; /* a cursor on LIVE in txn */
    int write_txn;
} xm_io;

/* Enter the gate, check vol and the byte range (write: also that vol is writable), and open a
 * transaction (a pooled read one, or a write one if write_txn) with a cursor on LIVE.  Returns
 * XM_OK with everything held (no transaction if length is 0: nothing to do), or an error with
 * only the gate held: xm_io_end releases what is held. */
int xm_io_begin(xm_io *io, xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, int write,
                int write_txn);
/* The same, looking the range up in the overlay (into *ov) between the checks and the
 * transaction (see xm_ovhits). */
int xm_io_begin_ov(xm_io *io, xm_store *st, uint32_t vol, uint64_t offset, uint64_t length,
                   int write, xm_ovhits *ov);
/* Close the cursor, end the transaction (a write one is aborted unless committed before, by
 * xm_io_commit) and leave the gate; returns rc. */
int xm_io_end(xm_io *io, int rc);
/* Commit the write transaction (closing the cursor first). */
int xm_io_commit(xm_io *io);

/* ---- room for the metadata on a full filesystem (xm_space.c) ---------------------------- */

/* At open (after the databases): the thresholds, lock.mdb's blocks, the first reservation. */
void xm_space_open(xm_store *st);
void xm_space_close(xm_store *st);
/* After every commit of a write transaction: top data.mdb's reservation up. */
void xm_space_after_commit(xm_store *st);
/* ---- encrypted volumes (xm_crypt.c) ------------------------------------------------------ */

/* Pool I/O of vol from block pbn, which holds vol's logical block lba (XM_NO_LBA: unknown).
 * out->c NULL for a plain volume, or raw (out->raw: the calling thread is in raw mode and vol
 * is encrypted: no cipher, whole blocks only); else a fresh context (enc: encrypting) holding
 * vol's key, to free with EVP_CIPHER_CTX_free, and out->tweak the data unit number of block
 * pbn (lba or pbn, by vol's tweak mode).  XM_ELOCKED for a locked volume; EINVAL for an
 * lba-tweak volume and lba XM_NO_LBA. */
typedef struct {
    EVP_CIPHER_CTX *c;
    uint64_t tweak;
    int raw;
} xm_crypt;
int xm_crypt_begin(xm_store *st, uint32_t vol, int enc, uint64_t pbn, uint64_t lba,
                   xm_crypt *out);
/* En- or decrypt nblocks whole blocks from in to out (may be equal): XTS, one 4 KiB data unit
 * per block, block i with tweak tweak0+i. */
int xm_crypt_blocks(EVP_CIPHER_CTX *c, uint64_t tweak0, uint64_t nblocks, const uint8_t *in,
                    uint8_t *out);
/* Wipe and free every key slot (xm_close). */
void xm_crypt_close(xm_store *st);
/* Begin an LMDB write transaction: every C path that writes begins here (xm_kv.c; group commit
 * applies its overlay first). */
int xm_wtxn_begin(xm_store *st, MDB_txn **out);

#endif
