/*
 * xm_bulk.h - what the bulk walks' C files (xm_bulk.c, xm_bulk_rb.c) share: one chunk's
 * transaction and the allocator twins (allocator.release / share in C).
 */
#ifndef SNAPDISK_XM_BULK_H
#define SNAPDISK_XM_BULK_H

#include "xm_internal.h"

extern uint64_t xm_bulk_nops; /* xm_bulk_ops() */
#define OP() __atomic_fetch_add(&xm_bulk_nops, 1, __ATOMIC_RELAXED)

/* Runs freed by one chunk, grown as needed. */
typedef struct {
    uint64_t (*run)[2];
    size_t n, cap;
} freed_list;

/* What one chunk's transaction carries. */
typedef struct {
    xm_store *st;
    MDB_txn *t;
    uint64_t seq; /* the seq of this transaction's frees, 0 until the first (allocator._txn_seq) */
    freed_list freed;
} chunk;

typedef struct {
    uint64_t s, len, refs;
} refs_run;

int bk_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl);
int bk_del(MDB_txn *t, MDB_dbi d, const void *k, size_t kl);
/* The value under k if it is exactly want bytes long (XM_ENOTFOUND, XM_ECORRUPT). */
int bk_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
                 const uint8_t **out);
int freed_add(freed_list *f, uint64_t pbn, uint64_t len);
int bk_begin(chunk *c, xm_store *st);
/* Commit (rc == XM_OK) or abort; after a commit, punch merged freed runs >= punch_min. */
int bk_end(chunk *c, int rc, uint64_t punch_min);
/* REFS runs overlapping [pbn, end) (allocator._refs_overlapping). */
int bk_refs_overlapping(chunk *c, uint64_t pbn, uint64_t end, refs_run *out, size_t cap, size_t *n);
int bk_set_refs(chunk *c, const refs_run *r, uint64_t start, uint64_t stop, uint64_t refs);
int bk_put_refs(chunk *c, uint64_t pbn, uint64_t len, uint64_t refs);
/* allocator.release: one record no longer holds [pbn, pbn+n), n <= XM_MAX_EXTENT. */
int bk_release(chunk *c, uint64_t pbn, uint64_t n);
/* extmap.put_live (LIVEBIRTH too while the volume has snapshots) and allocator.share
 * (xm_bulk_rb.c). */
int bk_live_put(chunk *c, uint32_t vol, xm_volstate *vs, const xm_extent *e);
int bk_share(chunk *c, uint64_t pbn, uint64_t n);

#endif
