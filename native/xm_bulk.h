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

/* What one chunk's transaction carries (also a batch's, for its releases: xm_batch.c). */
typedef struct bk_chunk {
    xm_store *st;
    MDB_txn *t;
    uint64_t seq; /* the seq of this transaction's frees, 0 until the first (allocator._txn_seq) */
    int merge; /* bk_release_later was used: PENDING gets the free pieces merged */
    freed_list later; /* bk_release_later: releases settled in pbn order (bk_settle) */
    freed_list pendq; /* free pieces, put in PENDING in key order by bk_settle */
    freed_list freed; /* runs put in PENDING, punched after the commit */
    MDB_cursor *cur[XM_DB_COUNT]; /* bk_cput / bk_cdel: one cursor per database, kept */
} chunk;

typedef struct {
    uint64_t s, len, refs;
} refs_run;

int bk_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl);
int bk_del(MDB_txn *t, MDB_dbi d, const void *k, size_t kl);
/* The same through the chunk's cursor on db: LMDB's cursor search first looks at the page the
 * cursor stands on (mdb_cursor_set), so puts and deletes in key order mostly skip the descent
 * from the root that mdb_put / mdb_del make each time. */
int bk_cput(chunk *c, int db, const void *k, size_t kl, const void *v, size_t vl);
int bk_cdel(chunk *c, int db, const void *k, size_t kl);
/* The value under k if it is exactly want bytes long (XM_ENOTFOUND, XM_ECORRUPT). */
int bk_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
                 const uint8_t **out);
int freed_add(freed_list *f, uint64_t pbn, uint64_t len);
/* Sort runs by (pbn, len) (an LSD radix sort: qsort's merge sort and its calls per comparison
 * were a tenth of a delete's CPU). */
int freed_sort(freed_list *f);
/* Stable LSD radix sort of n elements of es bytes by the u64 at byte offset off (tmp: scratch
 * of n * es bytes); a byte every key shares costs one counting pass and no move. */
void bk_radix_u64(void *v, void *tmp, size_t n, size_t es, size_t off);
int bk_begin(chunk *c, xm_store *st);
/* Close c's cursors and free its lists, its transaction left open (a batch's releases). */
void bk_forget(chunk *c);
/* Commit (rc == XM_OK) or abort; after a commit, punch merged freed runs >= punch_min. */
int bk_end(chunk *c, int rc, uint64_t punch_min);
/* REFS runs overlapping [pbn, end) (allocator._refs_overlapping). */
int bk_refs_overlapping(chunk *c, uint64_t pbn, uint64_t end, refs_run *out, size_t cap, size_t *n);
int bk_set_refs(chunk *c, const refs_run *r, uint64_t start, uint64_t stop, uint64_t refs);
int bk_put_refs(chunk *c, uint64_t pbn, uint64_t len, uint64_t refs);
/* allocator.release: one record no longer holds [pbn, pbn+n), n <= XM_MAX_EXTENT. */
int bk_release(chunk *c, uint64_t pbn, uint64_t n);
/* The same for a record that is its blocks' only holder (a live record not flagged SHARED):
 * no REFS lookup. */
int bk_release_own(chunk *c, uint64_t pbn, uint64_t n);
/* extmap.put_live (LIVEBIRTH too while the volume has snapshots) and allocator.share
 * (xm_bulk_rb.c). */
/* A release deferred to the end of the chunk (snapshot and volume delete): bk_settle sorts
 * them by pbn, settles REFS, and puts the pending pieces merged (adjacent runs coalesced) in
 * PENDING in key order: allocator.release_sorted is the twin. */
int bk_release_later(chunk *c, uint64_t pbn, uint64_t n);
/* Delete the cursor's current entry (key kb, kl bytes: a copy of it) and position the cursor
 * on the next one (*k, *v; MDB_NOTFOUND at the end). */
/* Before the commit (bk_end): the deferred releases, the PENDING puts in key order (this
 * chunk's seq is new, so they are appends), META `blocks` counted up once. */
int bk_settle(chunk *c);
int bk_cursor_del_next(MDB_cursor *cur, uint8_t *kb, size_t kl, MDB_val *k, MDB_val *v);
int bk_live_put(chunk *c, uint32_t vol, xm_volstate *vs, const xm_extent *e);
int bk_share(chunk *c, uint64_t pbn, uint64_t n);

#endif
