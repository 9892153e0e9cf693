/*
 * xm_internal.h - what the C files of the store share and nobody else sees: the store handle,
 * the LMDB return-code mapping, the live-map scan and the hot-path prologue/epilogue.
 */
#ifndef SNAPDISK_XM_INTERNAL_H
#define SNAPDISK_XM_INTERNAL_H

#define _GNU_SOURCE
#include <lmdb.h>
#include <pthread.h>
#include <sys/types.h>

#include "xm.h"

#define RTXN_POOL 64   /* reset read transactions kept for the hot path */
#define BATCH 256      /* map records a hot-path call decodes at a time */
#define RMW_LOCKS 64   /* stripes of the pool seam's read-modify-write lock */

/* Encrypted volumes (xm_crypt.c): key slot states, as xm_vol_key_state returns them. */
typedef struct xm_keyslot xm_keyslot;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX; /* OpenSSL's, as <openssl/types.h> has it */

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
};

struct xm_txn {
    xm_store *st;
    MDB_txn *txn;
    int write; /* commits of write transactions call xm_space_after_commit */
};

struct xm_cur {
    xm_store *st;
    MDB_cursor *cur;
};

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

/* For pool I/O of vol: *out NULL for a plain volume, else a fresh context (enc: encrypting)
 * holding vol's key, to free with EVP_CIPHER_CTX_free; XM_ELOCKED for a locked volume. */
int xm_crypt_begin(xm_store *st, uint32_t vol, int enc, EVP_CIPHER_CTX **out);
/* En- or decrypt nblocks whole blocks from in to out (may be equal): XTS, one 4 KiB data unit
 * per block, block pbn+i with tweak pbn+i. */
int xm_crypt_blocks(EVP_CIPHER_CTX *c, uint64_t pbn, uint64_t nblocks, const uint8_t *in,
                    uint8_t *out);
/* Wipe and free every key slot (xm_close). */
void xm_crypt_close(xm_store *st);
/* Begin an LMDB write transaction: every C path that writes begins here (xm_kv.c; group commit
 * applies its overlay first). */
int xm_wtxn_begin(xm_store *st, MDB_txn **out);

#endif
