/*
 * xm_resv.c - where group commit's redirected writes get their blocks: an in-memory reservation
 * of free runs (still FREE in LMDB until the batch that uses them commits, so a crash leaks
 * nothing), and the FREE edits with which a batch claims them (xm_batch.c).
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---- the reservation ---------------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_run(const void *a, const void *b)
{
    return cmp_u64(&((const xm_run *)a)->pbn, &((const xm_run *)b)->pbn);
}

/* Sort runs[0..n) by pbn and merge the overlapping and adjacent ones, in place; the new count. */
static size_t coalesce(xm_run *runs, size_t n)
{
    size_t k = 0;
    qsort(runs, n, sizeof *runs, cmp_run);
    for (size_t i = 0; i < n; i++) {
        if (runs[i].len == 0)
            continue;
        if (k > 0 && runs[i].pbn <= runs[k - 1].pbn + runs[k - 1].len) {
            uint64_t end = runs[i].pbn + runs[i].len;
            if (end > runs[k - 1].pbn + runs[k - 1].len)
                runs[k - 1].len = end - runs[k - 1].pbn;
        } else {
            runs[k++] = runs[i];
        }
    }
    return k;
}

/* Add [pbn, pbn+len) minus the sorted, disjoint runs held[] to the reservation, up to want
 * blocks. */
static void resv_add(xm_store *st, uint64_t pbn, uint64_t len, const xm_run *held, size_t nheld,
                     uint64_t want)
{
    uint64_t end = pbn + len;
    size_t lo = 0, hi = nheld; /* the first held run that ends after pbn */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (held[mid].pbn + held[mid].len <= pbn)
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t i = lo;
    while (pbn < end && st->resv_blocks < want && st->nresv < RESV_RUNS) {
        if (i < nheld && held[i].pbn <= pbn) { /* skip blocks the overlay may hold */
            pbn = held[i].pbn + held[i].len;
            i++;
            continue;
        }
        uint64_t stop = i < nheld && held[i].pbn < end ? held[i].pbn : end;
        uint64_t take = stop - pbn;
        if (take > want - st->resv_blocks)
            take = want - st->resv_blocks;
        if (take > XM_MAX_EXTENT)
            take = XM_MAX_EXTENT;
        st->resv[st->nresv++] = (xm_extent){0, pbn, 0, (uint32_t)take, 0};
        st->resv_blocks += take;
        pbn += take;
    }
}

/* The blocks the overlay holds (pending, taken and superseded entries), exactly, as sorted
 * disjoint runs in a malloc()ed array (*out; NULL when there are none).  Scans the whole
 * table (6 MiB at the default bound) and sorts up to ov_max blocks: ~2 ms, which made
 * reservations ~6 % of a redirected write's request thread when every one did it. */
static int held_exact(xm_store *st, xm_run **out, size_t *nout)
{
    size_t n = 0, want = st->ov_count + st->ov_nprev;
    uint64_t *used;
    *out = NULL;
    *nout = 0;
    if (want == 0)
        return XM_OK;
    if (!(used = malloc(want * sizeof *used)))
        return ENOMEM;
    for (uint32_t i = 0; i < st->ov_slots && n < st->ov_count; i++)
        if (st->ov[i].used)
            used[n++] = st->ov[i].pbn;
    for (uint32_t i = 0; i < st->ov_nprev; i++) /* superseded entries hold their blocks too */
        used[n++] = st->ov_prev[i].pbn;
    qsort(used, n, sizeof *used, cmp_u64);
    xm_run *runs = malloc(n * sizeof *runs);
    if (!runs) {
        free(used);
        return ENOMEM;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t b = used[i];
        if (k > 0 && b <= runs[k - 1].pbn + runs[k - 1].len) {
            if (b == runs[k - 1].pbn + runs[k - 1].len)
                runs[k - 1].len++;
        } else {
            runs[k++] = (xm_run){b, 1};
        }
    }
    free(used);
    *out = runs;
    *nout = k;
    return XM_OK;
}

/* A new reservation of at least want blocks: free runs from the next-fit hint on, then from
 * the start, then the space at the high-water mark, minus the blocks the overlay holds (they
 * are still FREE in LMDB until their batch commits).
 *
 * It reads FREE in a read transaction, not LMDB's writer lock: a batch holds that lock for
 * its whole apply and commit (tens of ms under load), and a writer waiting for it here stalled
 * 11 % of the time (measured in process at 25k redirected writes/s).  Why a read snapshot
 * suffices: everything below runs under ov_mu, with no foreign write transaction open (they
 * allocate from FREE: waited for; one that begins later takes ov_mu and drops this
 * reservation, xm_wtxn_begin) and no redirect in flight between xm_ov_alloc and xm_ov_insert
 * (waited for).  The only other writer is a batch, which claims exactly overlay entries'
 * blocks and may put a gap below them in FREE.  The read transaction begins, and `held` is
 * made, under the same hold of ov_mu; a batch settles (drops its entries) under ov_mu only
 * after its commit.  So either the snapshot predates the batch's commit and its entries are
 * in `held`, or it includes the commit and their blocks are no longer FREE: no block in the
 * overlay, in flight or claimed is handed out twice.
 *
 * `held` is a superset of the overlay's blocks.  It is made exactly (held_exact) when the
 * overlay is empty, every HELD_REBUILD reservations, after a foreign transaction, and when
 * the superset leaves the reservation short (a nearly full pool); otherwise it is the last
 * one plus the runs of the reservation being replaced: every block the overlay gained since
 * was handed out from those (the only other writer of FREE, a foreign transaction,
 * invalidates held).  A block of held that left the overlay (claimed by its batch, perhaps
 * freed since) is merely not reserved again until the next exact rebuild. */

static int reserve(xm_store *st, uint64_t want)
{
    MDB_txn *t = NULL;
    MDB_cursor *c = NULL;
    uint64_t alloc[2];
    xm_run *exact = NULL;
    const xm_run *held;
    size_t nheld;
    int rc;
    pthread_mutex_lock(&st->ov_mu);
    while (st->ov_inflight || st->ov_foreign)
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    if ((rc = xm_rtxn_get(st, &t))) {
        t = NULL;
        goto out;
    }
    int fresh = !st->held_valid || st->held_age + 1 >= HELD_REBUILD || st->ov_count + st->ov_nprev == 0;
    for (int is_exact = fresh;; is_exact = 1) {
        if (is_exact) {
            free(exact);
            if ((rc = held_exact(st, &exact, &nheld)))
                goto out;
            held = exact;
            st->held_valid = nheld <= HELD_RUNS;
            st->held_age = 0;
            if (st->held_valid) {
                memcpy(st->held, exact, nheld * sizeof *exact);
                st->nheld = nheld;
            }
        } else {
            size_t n = st->nheld;
            if (n + st->nresv_made > HELD_RUNS)
                continue; /* exactly, then */
            memcpy(st->held + n, st->resv_made, st->nresv_made * sizeof *st->held);
            st->nheld = coalesce(st->held, n + st->nresv_made);
            st->held_age++;
            held = st->held;
            nheld = st->nheld;
        }
        st->nresv_made = 0;
        st->nresv = 0;
        st->resv_blocks = 0;
        if ((rc = xm_row_meta_get2(st, t, XM_META_ALLOC, alloc)))
            goto out;
        if (!c && (rc = xm_rc(mdb_cursor_open(t, st->dbi[XM_DB_FREE], &c))))
            goto out;
        for (int pass = 0; pass < 2 && st->resv_blocks < want && st->nresv < RESV_RUNS; pass++) {
            uint8_t kb[XM_PBN_KEY_LEN];
            xm_put_be64(kb, pass == 0 ? alloc[1] : 0);
            MDB_val k = {sizeof kb, kb}, v;
            int r = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
            while (r == 0 && st->resv_blocks < want && st->nresv < RESV_RUNS) {
                uint64_t pbn, len;
                if ((rc = xm_row_free_run(st, &k, &v, &pbn, &len)))
                    goto out;
                if (pass == 1 && pbn >= alloc[1])
                    break;
                resv_add(st, pbn, len, held, nheld, want);
                r = mdb_cursor_get(c, &k, &v, MDB_NEXT);
            }
            if (r && r != MDB_NOTFOUND) {
                rc = xm_rc(r);
                goto out;
            }
        }
        if (st->resv_blocks < want && st->nresv < RESV_RUNS) {
            const uint8_t *p;
            rc = xm_row_get_fixed(st, t, st->dbi[XM_DB_META], XM_META_POOL_BLOCKS,
                                  strlen(XM_META_POOL_BLOCKS), XM_U64_LEN, &p);
            if (rc)
                goto out;
            uint64_t pool_blocks = xm_get_le64(p);
            if (alloc[0] < pool_blocks)
                resv_add(st, alloc[0], pool_blocks - alloc[0], held, nheld, want);
        }
        if (is_exact || st->resv_blocks >= want || st->nresv >= RESV_RUNS)
            break;
        /* short on the superset (a nearly full pool?): again, exactly */
    }
    for (size_t i = 0; i < st->nresv; i++)
        st->resv_made[i] = (xm_run){st->resv[i].pbn, st->resv[i].len};
    st->nresv_made = st->nresv;
    if (st->resv_blocks == 0)
        rc = ENOSPC;
out:
    if (rc) {
        st->nresv = 0;
        st->resv_blocks = 0;
        st->nresv_made = 0;
        st->held_valid = 0;
    }
    pthread_mutex_unlock(&st->ov_mu);
    if (c)
        mdb_cursor_close(c);
    if (t)
        xm_rtxn_put(st, t);
    free(exact);
    return rc;
}

int xm_ov_alloc(xm_store *st, uint64_t need, xm_extent *out, size_t cap, size_t *nout)
{
    for (int attempt = 0;; attempt++) {
        pthread_mutex_lock(&st->ov_mu);
        if (st->resv_blocks >= need) {
            size_t n = 0, i = 0;
            uint64_t left = need;
            while (left > 0 && n < cap) {
                xm_extent *r = &st->resv[i];
                uint64_t take = r->len < left ? r->len : left;
                out[n++] = (xm_extent){0, r->pbn, 0, (uint32_t)take, 0};
                r->pbn += take;
                r->len -= (uint32_t)take;
                left -= take;
                if (r->len == 0)
                    i++;
            }
            if (left == 0) {
                memmove(st->resv, st->resv + i, (st->nresv - i) * sizeof *st->resv);
                st->nresv -= i;
                st->resv_blocks -= need;
                st->ov_inflight++;
                pthread_mutex_unlock(&st->ov_mu);
                *nout = n;
                return XM_OK;
            }
            /* too fragmented for cap runs: undo and let the general path do it */
            st->nresv = 0;
            st->resv_blocks = 0;
            pthread_mutex_unlock(&st->ov_mu);
            return XM_ESLOW;
        }
        pthread_mutex_unlock(&st->ov_mu);
        if (attempt >= 2)
            return ENOSPC;
        int rc = reserve(st, need > RESV_BLOCKS ? need : RESV_BLOCKS);
        if (rc == ENOSPC && attempt == 0)
            continue; /* a smaller reservation may still fit need */
        if (rc)
            return rc;
    }
}

void xm_ov_inflight_done(xm_store *st)
{
    if (--st->ov_inflight == 0)
        pthread_cond_broadcast(&st->ov_cv);
}

/* Unpublished blocks back to the front of the reservation (with ov_mu), so a retried write
 * gets the same ones and sequential writes stay contiguous.  Still FREE in LMDB, and nobody
 * drops the reservation while they are in flight. */
void xm_ov_give_back(xm_store *st, const xm_extent *runs, size_t n)
{
    if (n == 0 || st->nresv + n > RESV_RUNS)
        return; /* simply not reused by this reservation */
    memmove(st->resv + n, st->resv, st->nresv * sizeof *st->resv);
    for (size_t i = 0; i < n; i++) {
        st->resv[i] = (xm_extent){0, runs[i].pbn, 0, runs[i].len, 0};
        st->resv_blocks += runs[i].len;
    }
    st->nresv += n;
}

void xm_ov_discard(xm_store *st, const xm_extent *runs, size_t n)
{
    pthread_mutex_lock(&st->ov_mu);
    xm_ov_give_back(st, runs, n);
    xm_ov_inflight_done(st);
    pthread_mutex_unlock(&st->ov_mu);
}

int xm_ov_ensure(xm_store *st, uint64_t need)
{
    pthread_mutex_lock(&st->ov_mu);
    int ok = st->resv_blocks >= need;
    pthread_mutex_unlock(&st->ov_mu);
    return ok ? XM_OK : reserve(st, need > RESV_BLOCKS ? need : RESV_BLOCKS);
}

/* Put [pbn, pbn+len) into FREE, coalescing with its neighbours. */
int xm_free_insert(xm_store *st, MDB_txn *t, uint64_t pbn, uint64_t len)
{
    MDB_cursor *c;
    uint8_t kb[XM_PBN_KEY_LEN], vb[XM_U64_LEN];
    int rc = xm_rc(mdb_cursor_open(t, st->dbi[XM_DB_FREE], &c));
    if (rc)
        return rc;
    xm_put_be64(kb, pbn + len);
    MDB_val k = {sizeof kb, kb}, v;
    int r = mdb_cursor_get(c, &k, &v, MDB_SET_KEY); /* the run just after */
    uint64_t p, l;
    if (r == 0 && (rc = xm_row_free_run(st, &k, &v, &p, &l)) == XM_OK) {
        len += l;
        rc = xm_rc(mdb_cursor_del(c, 0));
    }
    if (rc == XM_OK) {
        xm_put_be64(kb, pbn);
        k = (MDB_val){sizeof kb, kb};
        r = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        r = r == 0 ? mdb_cursor_get(c, &k, &v, MDB_PREV) : mdb_cursor_get(c, &k, &v, MDB_LAST);
        if (r == 0 && (rc = xm_row_free_run(st, &k, &v, &p, &l)) == XM_OK && p + l == pbn) {
            pbn = p;
            len += l;
            rc = xm_rc(mdb_cursor_del(c, 0));
        }
    }
    mdb_cursor_close(c);
    if (rc)
        return rc;
    xm_put_be64(kb, pbn);
    xm_put_le64(vb, len);
    return xm_row_put(t, st->dbi[XM_DB_FREE], kb, sizeof kb, vb, sizeof vb);
}

/* Take [pbn, pbn+len) out of FREE (it must be there). */
int xm_free_take(xm_store *st, MDB_txn *t, uint64_t pbn, uint64_t len)
{
    while (len > 0) {
        MDB_cursor *c;
        uint8_t kb[XM_PBN_KEY_LEN], vb[XM_U64_LEN];
        uint64_t p, l;
        int rc = xm_rc(mdb_cursor_open(t, st->dbi[XM_DB_FREE], &c));
        if (rc)
            return rc;
        xm_put_be64(kb, pbn + 1);
        MDB_val k = {sizeof kb, kb}, v;
        int r = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        r = r == 0 ? mdb_cursor_get(c, &k, &v, MDB_PREV) : mdb_cursor_get(c, &k, &v, MDB_LAST);
        if (r)
            rc = r == MDB_NOTFOUND ? XM_ECORRUPT : xm_rc(r);
        else if ((rc = xm_row_free_run(st, &k, &v, &p, &l)) == XM_OK && !(p <= pbn && pbn < p + l))
            rc = XM_ECORRUPT; /* the overlay's block is not free: cannot happen */
        if (rc == XM_OK)
            rc = xm_rc(mdb_cursor_del(c, 0));
        mdb_cursor_close(c);
        if (rc)
            return rc;
        uint64_t take = p + l - pbn < len ? p + l - pbn : len;
        if (pbn > p) {
            xm_put_be64(kb, p);
            xm_put_le64(vb, pbn - p);
            if ((rc = xm_row_put(t, st->dbi[XM_DB_FREE], kb, sizeof kb, vb, sizeof vb)))
                return rc;
        }
        if (pbn + take < p + l) {
            xm_put_be64(kb, pbn + take);
            xm_put_le64(vb, p + l - pbn - take);
            if ((rc = xm_row_put(t, st->dbi[XM_DB_FREE], kb, sizeof kb, vb, sizeof vb)))
                return rc;
        }
        pbn += take;
        len -= take;
    }
    return XM_OK;
}
