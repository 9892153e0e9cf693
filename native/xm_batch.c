/*
 * xm_batch.c - group commit of redirected writes.
 *
 * xm_write_row no longer runs an LMDB write transaction per request.  It writes the data to
 * blocks taken from an in-memory reservation of free runs (still FREE in LMDB: a crash leaks
 * nothing) and publishes the map change in an in-memory overlay: a hash of (vol, lba) -> (pbn,
 * birth), one entry per block.  The hot path consults the overlay first (xm_io_begin_ov): a
 * block in it reads from its new pbn, and is the volume's own, born now, so later writes go
 * in place to it.  One LMDB write transaction applies the overlay (claiming the blocks from
 * FREE or the high-water mark, then xm_row_overlay: kills, dead records, counters, exactly the
 * old per-request transaction's changes):
 *   - by the committer thread when a batch is due: its oldest entry is interval_us old (250 ms)
 *     or the overlay holds ov_max / 2 blocks (xm_batch_life.c);
 *   - at every xm_sync (FLUSH, FUA, close), synchronously;
 *   - at the start of every other write transaction (xm_wtxn_begin: rollback, clone, delete,
 *     trim, the Python write path...), inside it, so those see and commit it; not a
 *     snapshot's: entries survive a snapshot and keep their birth (xm_batch_life.c);
 *   - when the overlay holds ov_max blocks, by the writer that would pass the bound.
 * The pool is fdatasync()ed before every transaction that applies entries: data before the
 * map that points at it.  A redirect kills records that a snapshot holds (dead records) or
 * SHARED records, whose blocks other records hold too; a batch releases the latter (REFS one
 * holder fewer; a block that loses its last holder goes to PENDING under the batch's seq, like
 * every free, reusable only after a sync with the I/O gate closed: allocator.py).
 *
 * Consistency: an entry is removed only after the commit that put it in LIVE, and readers look
 * the overlay up before taking their read transaction, so a block is always found in one or
 * the other.  A redirect decided on a map that changed before it was published (ov_gen moved:
 * another commit, or a foreign transaction is open) or on a block that got an entry meanwhile
 * is not published: xm_write_row starts over (XM_EAGAIN_ROW).  So the applier only ever kills
 * records a snapshot holds or SHARED records the entry says to release (ov_ent.release), as
 * the per-request transaction did.
 *
 * The reservation and the FREE edits of a claim are xm_resv.c; the committer thread, start,
 * stop and the knobs are xm_batch_life.c.
 *
 * Superseded entries: a block whose entry survived a snapshot, written whole again before
 * its batch, gets a new entry; the old one moves to ov_prev (oldest first, ov_prev_cap) and is
 * applied first by the batch that applies the new one (take_upto, cmp_map), so it becomes the
 * snapshot's dead record.  A block may collect a chain of them (a snapshot and a write, again
 * and again, between two batches): (vol, lba, seq) order applies the chain oldest first.
 * Readers see only the table, i.e. the newest entry.
 *
 * Memory: at most ov_max blocks (default 32768: 128 MiB of data; 4 * ov_max slots of 40 bytes,
 * 5 MiB), a spare of half the slots, ov_max / 4 superseded entries; a writer that would pass
 * ov_max applies the batch first.
 */
#include "xm_bulk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t ov_hash(uint32_t vol, uint64_t lba)
{
    uint64_t x = lba * 0x9E3779B97F4A7C15ull ^ ((uint64_t)vol * 0xC2B2AE3D27D4EB4Full);
    return x ^ (x >> 29);
}

static ov_ent *ov_find(xm_store *st, uint32_t vol, uint64_t lba)
{
    uint32_t m = st->ov_slots - 1;
    for (uint32_t i = (uint32_t)ov_hash(vol, lba) & m;; i = (i + 1) & m) {
        ov_ent *e = &st->ov[i];
        if (!e->used)
            return NULL;
        if (e->vol == vol && e->lba == lba)
            return e;
    }
}

static void ov_put(xm_store *st, const ov_ent *src)
{
    uint32_t m = st->ov_slots - 1;
    uint32_t i = (uint32_t)ov_hash(src->vol, src->lba) & m;
    while (st->ov[i].used)
        i = (i + 1) & m;
    st->ov[i] = *src;
    st->ov[i].used = 1;
    st->ov_count++;
}

/* Drop the taken entries (committed) or make them pending again (aborted).  With ov_mu. */
static void ov_settle(xm_store *st, int committed)
{
    xm_drop_kick(st); /* the pages of the blocks it moved to dead lists (xm_drop.c) */
    st->ov_busy = 0;
    pthread_cond_broadcast(&st->ov_cv);
    /* superseded entries: the taken ones are in LIVE now (committed) or pending again */
    uint32_t kp = 0;
    for (uint32_t i = 0; i < st->ov_nprev; i++) {
        if (st->ov_prev[i].taken && committed)
            continue;
        st->ov_prev[i].taken = 0;
        st->ov_prev[kp++] = st->ov_prev[i];
    }
    st->ov_nprev = kp;
    /* Every write transaction settles: one that took nothing (a bulk chunk, a Python
     * transaction with an empty overlay) must not pay the table's scan and memset (perf: 25 %
     * of a rollback's CPU, with reserve's scan below). */
    uint32_t ntaken = st->ov_ntaken;
    st->ov_ntaken = 0;
    if (ntaken == 0)
        return;
    if (committed && ntaken == st->ov_count) { /* all of them: the common case */
        memset(st->ov, 0, st->ov_slots * sizeof *st->ov);
        st->ov_count = 0;
        return;
    }
    if (!committed) {
        for (uint32_t i = 0; i < st->ov_slots; i++)
            st->ov[i].taken = 0;
        return;
    }
    ov_ent *tmp = st->ov_spare; /* keep <= ov_slots / 2: xm_ov_insert's bound */
    uint32_t k = 0;
    for (uint32_t i = 0; i < st->ov_slots; i++)
        if (st->ov[i].used && !st->ov[i].taken)
            tmp[k++] = st->ov[i];
    memset(st->ov, 0, st->ov_slots * sizeof *st->ov);
    st->ov_count = 0;
    for (uint32_t i = 0; i < k; i++)
        ov_put(st, &tmp[i]);
    st->ov_first_ns = xm_now_ns(); /* (they came after the batch's fdatasync began) */
}

static int cmp_hit(const void *a, const void *b)
{
    const xm_extent *x = a, *y = b;
    return x->lba < y->lba ? -1 : x->lba > y->lba;
}

int xm_ov_lookup(xm_store *st, uint32_t vol, uint64_t lo, uint64_t hi, xm_ovhits *h)
{
    h->n = 0;
    h->hit = h->local;
    pthread_mutex_lock(&st->ov_mu);
    while (h->for_write && st->ov_foreign)
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    h->gen = st->ov_gen;
    if (st->ov_count == 0 || hi <= lo) {
        pthread_mutex_unlock(&st->ov_mu);
        return XM_OK;
    }
    uint64_t cap = hi - lo < st->ov_count ? hi - lo : st->ov_count;
    if (cap > sizeof h->local / sizeof h->local[0] && !(h->hit = malloc(cap * sizeof *h->hit))) {
        h->hit = h->local;
        pthread_mutex_unlock(&st->ov_mu);
        return ENOMEM;
    }
    if (hi - lo <= 2 * (uint64_t)st->ov_count) { /* probe each block */
        for (uint64_t b = lo; b < hi && h->n < cap; b++) {
            ov_ent *e = ov_find(st, vol, b);
            if (e)
                h->hit[h->n++] = (xm_extent){b, e->pbn, e->birth, 1, 0};
        }
    } else { /* a long range: scan the slots */
        for (uint32_t i = 0; i < st->ov_slots && h->n < cap; i++) {
            ov_ent *e = &st->ov[i];
            if (e->used && e->vol == vol && e->lba >= lo && e->lba < hi)
                h->hit[h->n++] = (xm_extent){e->lba, e->pbn, e->birth, 1, 0};
        }
        qsort(h->hit, h->n, sizeof *h->hit, cmp_hit);
    }
    pthread_mutex_unlock(&st->ov_mu);
    return XM_OK;
}

void xm_ov_free(xm_ovhits *h)
{
    if (h->hit && h->hit != h->local)
        free(h->hit);
    h->hit = h->local;
    h->n = 0;
}

int xm_ov_full(xm_store *st, uint64_t need)
{
    pthread_mutex_lock(&st->ov_mu);
    int full = st->ov_count + need > st->ov_max;
    pthread_mutex_unlock(&st->ov_mu);
    return full;
}

/* The record of recs[] (sorted by lba) that covers lba, NULL for a hole. */
static const xm_extent *covering(const xm_extent *recs, size_t nrecs, uint64_t lba)
{
    for (size_t i = 0; i < nrecs && recs[i].lba <= lba; i++)
        if (lba < recs[i].lba + recs[i].len)
            return &recs[i];
    return NULL;
}

uint64_t xm_batch_vol_growth(xm_store *st, uint32_t vol)
{
    uint64_t g = 0;
    pthread_mutex_lock(&st->ov_mu);
    for (uint32_t i = 0, seen = 0; i < st->ov_slots && seen < st->ov_count; i++)
        if (st->ov[i].used && (++seen, st->ov[i].vol == vol))
            g += st->ov[i].grow;
    for (uint32_t i = 0; i < st->ov_nprev; i++)
        if (st->ov_prev[i].vol == vol)
            g += st->ov_prev[i].grow;
    pthread_mutex_unlock(&st->ov_mu);
    return g;
}

int xm_ov_insert(xm_store *st, uint32_t vol, const xm_extent *blocks, size_t n, uint64_t birth,
                 uint64_t max_snap, uint64_t gen, const xm_extent *runs, size_t nruns,
                 const xm_extent *recs, size_t nrecs)
{
    int rc = XM_OK;
    uint64_t total = 0, nsup = 0;
    pthread_mutex_lock(&st->ov_mu);
    for (size_t r = 0; r < n; r++)
        total += blocks[r].len;
    if (st->ov_gen != gen || st->ov_foreign || st->ov_count + total > st->ov_slots / 2)
        rc = XM_EAGAIN_ROW;
    /* A block with an entry: one that survived a snapshot (born <= max_snap) is superseded;
     * the writer saw it (xm_write_row) and wrote the whole block elsewhere.  One born after
     * the newest snapshot is a race with another writer: start over. */
    for (size_t r = 0; r < n && rc == XM_OK; r++)
        for (uint32_t k = 0; k < blocks[r].len && rc == XM_OK; k++) {
            ov_ent *e = ov_find(st, vol, blocks[r].lba + k);
            if (e && e->birth > max_snap)
                rc = XM_EAGAIN_ROW;
            nsup += e != NULL;
        }
    if (rc == XM_OK && st->ov_nprev + nsup > st->ov_prev_cap)
        rc = XM_EAGAIN_ROW + 1;
    uint32_t before = st->ov_count;
    if (rc == XM_OK && before == 0)
        st->ov_first_ns = xm_now_ns();
    for (size_t r = 0; r < n && rc == XM_OK; r++)
        for (uint32_t k = 0; k < blocks[r].len; k++) {
            uint64_t lba = blocks[r].lba + k;
            const xm_extent *old = covering(recs, nrecs, lba);
            /* release: the block's record is SHARED and no snapshot holds it (else the
             * batch keeps it as a dead record, as for the volume's own blocks) */
            ov_ent nw = {lba, blocks[r].pbn + k, birth, ++st->ov_seq, vol, 1, 0, old == NULL,
                         old && (old->flags & XM_F_SHARED) && old->birth > max_snap};
            ov_ent *e = ov_find(st, vol, lba);
            if (e) { /* the old one is applied first (its seq is lower), then this one kills it */
                /* One a batch is applying right now (taken) moves with its mark: the settle
                 * drops it (committed) or makes it pending again (aborted) from ov_prev, and
                 * the table's count of taken entries loses it (ov_settle's fast path). */
                if (e->taken)
                    st->ov_ntaken--;
                st->ov_prev[st->ov_nprev++] = *e;
                nw.grow = 0; /* not a hole: the old entry (or one before it) fills it */
                nw.release = 0; /* what it replaces is the old entry's record, the volume's own */
                *e = nw;
            } else {
                ov_put(st, &nw);
            }
        }
    if (rc)
        xm_ov_give_back(st, runs, nruns);
    else if (before < st->ov_max / 2 && st->ov_count >= st->ov_max / 2)
        pthread_cond_signal(&st->cm_cv); /* a batch is due: the committer's wake-up */
    xm_ov_inflight_done(st);
    pthread_mutex_unlock(&st->ov_mu);
    return rc;
}

/* ---- applying the overlay ------------------------------------------------------------------ */

static int cmp_pbn(const void *a, const void *b)
{
    const ov_ent *x = a, *y = b;
    return x->pbn < y->pbn ? -1 : x->pbn > y->pbn;
}

static int cmp_map(const void *a, const void *b)
{
    const ov_ent *x = a, *y = b;
    if (x->vol != y->vol)
        return x->vol < y->vol ? -1 : 1;
    if (x->lba != y->lba)
        return x->lba < y->lba ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq; /* a superseded entry before its successor */
}

/* Claim the blocks of e[0..n) (sorted by pbn): FREE, or the high-water mark alloc[0] (a gap
 * below a claimed block goes to FREE). */
static int claim(xm_store *st, MDB_txn *t, const ov_ent *e, size_t n, uint64_t alloc[2],
                 uint64_t *taken, uint64_t *gap, uint64_t *top)
{
    int rc = XM_OK;
    for (size_t i = 0, j; i < n && rc == XM_OK; i = j) {
        for (j = i + 1; j < n && e[j].pbn == e[j - 1].pbn + 1;)
            j++;
        uint64_t pbn = e[i].pbn, len = j - i;
        if (pbn < alloc[0]) {
            uint64_t l = alloc[0] - pbn < len ? alloc[0] - pbn : len;
            rc = xm_free_take(st, t, pbn, l);
            *taken += l;
            pbn += l;
            len -= l;
        }
        if (rc == XM_OK && len > 0) {
            if (pbn > alloc[0]) {
                rc = xm_free_insert(st, t, alloc[0], pbn - alloc[0]);
                *gap += pbn - alloc[0];
            }
            alloc[0] = pbn + len;
        }
        if (e[j - 1].pbn + 1 > *top) /* the next-fit hint: past the highest block claimed */
            *top = e[j - 1].pbn + 1;
    }
    return rc;
}

/* Put e[0..n) (sorted by vol, lba) in the map. */
static int put_runs(xm_store *st, MDB_txn *t, MDB_cursor *c, const ov_ent *e, size_t n,
                    xm_row_counters *cnt, chunk *rel)
{
    int rc = XM_OK;
    for (size_t i = 0, j; i < n && rc == XM_OK; i = j) {
        uint8_t vk[XM_VOL_KEY_LEN], vb[XM_VOLSTATE_LEN];
        const uint8_t *raw;
        xm_volstate vs;
        xm_put_be32(vk, e[i].vol);
        if ((rc = xm_row_get_fixed(st, t, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, XM_VOLSTATE_LEN,
                                   &raw)))
            break;
        xm_volstate_decode(raw, XM_VOLSTATE_LEN, &vs);
        for (j = i; j < n && e[j].vol == e[i].vol && rc == XM_OK;) {
            size_t k = j + 1;
            /* runs of at most 240 blocks (xm_row_overlay scans BATCH records), cut at lbas
             * that are multiples of XM_MAX_EXTENT, so that sequential writes still fill records
             * to XM_MAX_EXTENT (a run merges into its left neighbour only whole) */
            while (k < n && k - j < 240 && e[k].lba % XM_MAX_EXTENT != 0 && e[k].vol == e[j].vol &&
                   e[k].lba == e[k - 1].lba + 1 &&
                   e[k].pbn == e[k - 1].pbn + 1 && e[k].birth == e[j].birth &&
                   e[k].release == e[j].release)
                k++;
            xm_extent nw = {e[j].lba, e[j].pbn, e[j].birth, (uint32_t)(k - j), 0};
            rc = xm_row_overlay_c(st, t, c, e[j].vol, &vs, &nw, cnt, e[j].release ? rel : NULL);
            j = k;
        }
        xm_volstate_encode(vb, &vs);
        if (rc == XM_OK)
            rc = xm_row_put(t, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, vb, sizeof vb);
    }
    return rc;
}

#define APPLY_CHUNK 128 /* entries between two looks at snap_want */
#define APPLY_TXN 4096  /* entries per transaction of a preemptible batch (batch_commit) */

/* Claim the entries' blocks (in pbn order: a reserved run is one FREE edit), then put them in
 * the map (in map order: neighbouring entries share B-tree pages, which stay hot).  With
 * preempt, a snapshot waiting for LMDB's writer lock (snap_want) stops it after the current
 * chunk of APPLY_CHUNK entries: *done < n, and the caller aborts the transaction, so that the
 * snapshot waits for one chunk, not for the whole batch and its msync.  COUNTERS are summed in
 * memory over the batch (xm_row_counters) and written once per key at the end. */
static int apply(xm_store *st, MDB_txn *t, ov_ent *e, size_t n, int preempt, size_t *done)
{
    uint64_t alloc[2], totals[2], taken = 0, gap = 0, top = 0;
    xm_row_counters cnt = {0};
    chunk rel = {.st = st, .t = t}; /* releases of entries that replace SHARED blocks */
    int rc;
    *done = 0;
    if ((rc = xm_row_meta_get2(st, t, XM_META_ALLOC, alloc)) ||
        (rc = xm_row_meta_get2(st, t, XM_META_BLOCKS, totals)))
        return rc;
    qsort(e, n, sizeof *e, cmp_pbn);
    if ((rc = claim(st, t, e, n, alloc, &taken, &gap, &top)))
        return rc;
    qsort(e, n, sizeof *e, cmp_map);
    MDB_cursor *c;
    if ((rc = xm_rc(mdb_cursor_open(t, st->dbi[XM_DB_LIVE], &c))))
        return rc;
    size_t i = 0;
    while (i < n && rc == XM_OK) {
        if (preempt && __atomic_load_n(&st->snap_want, __ATOMIC_ACQUIRE))
            break;
        size_t m = n - i < APPLY_CHUNK ? n - i : APPLY_CHUNK;
        rc = put_runs(st, t, c, e + i, m, &cnt, &rel);
        i += m;
    }
    mdb_cursor_close(c);
    if (rc || i < n)
        goto out;
    if ((rc = xm_row_counters_flush(st, t, &cnt)))
        goto out;
    if (totals[0] + gap < taken) {
        rc = XM_ECORRUPT;
        goto out;
    }
    totals[0] = totals[0] + gap - taken;
    if (top)
        alloc[1] = top;
    if ((rc = xm_row_meta_put2(st, t, XM_META_ALLOC, alloc)) ||
        (rc = xm_row_meta_put2(st, t, XM_META_BLOCKS, totals)))
        goto out;
    /* Released blocks go to PENDING under this transaction's seq, after META blocks is put
     * (bk_settle adds them to it): reusable only once this batch is durable and the I/O gate
     * has been closed (allocator.py, "Why PENDING"), like every other free. */
    rc = bk_settle(&rel);
out:
    *done = i;
    bk_forget(&rel);
    return rc;
}

/* Reorder c[0..m) so that c[k] is the entry a sort by cmp_map would put there, with no greater
 * one before it and no smaller one after (quickselect, median of three; k < m).  A full qsort
 * of every pending entry for each sub-transaction of a big batch was a fifth of a receive's
 * writer CPU (perf: glibc's merge sort and its call per comparison). */
static void select_kth(ov_ent **c, size_t m, size_t k)
{
    size_t lo = 0, hi = m - 1;
    while (hi > lo) {
        size_t mid = lo + (hi - lo) / 2;
        ov_ent *t;
        /* order c[lo], c[mid], c[hi]; the median to c[hi] as the pivot */
        if (cmp_map(c[mid], c[lo]) < 0)
            t = c[mid], c[mid] = c[lo], c[lo] = t;
        if (cmp_map(c[hi], c[lo]) < 0)
            t = c[hi], c[hi] = c[lo], c[lo] = t;
        if (cmp_map(c[mid], c[hi]) < 0)
            t = c[mid], c[mid] = c[hi], c[hi] = t;
        ov_ent *pivot = c[hi];
        size_t i = lo;
        for (size_t j = lo; j < hi; j++)
            if (cmp_map(c[j], pivot) < 0)
                t = c[i], c[i] = c[j], c[j] = t, i++;
        t = c[i], c[i] = c[hi], c[hi] = t; /* the pivot at its sorted place i */
        if (i == k)
            return;
        if (i < k)
            lo = i + 1;
        else
            hi = i - 1;
    }
}

/* Mark the entries published up to max_seq taken and copy them out (caller frees *out);
 * ov_settle must follow.  At most about limit of them: then the first in map order, a block's
 * chain of superseded entries kept whole, and *more says some were left for the next
 * transaction.  Called with ov_mu and LMDB's writer lock held.  The previous transaction may
 * have committed (and released the writer lock) without having settled its entries yet: wait
 * for that, or they would be applied twice. */
static int take_upto(xm_store *st, ov_ent **out, size_t *n, uint64_t max_seq, size_t limit,
                     int *more)
{
    *n = 0;
    *out = NULL;
    *more = 0;
    while (st->ov_busy)
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    st->ov_busy = 1;
    st->ov_ntaken = 0;
    size_t cap = (size_t)st->ov_count + st->ov_nprev, m = 0;
    if (cap == 0)
        return XM_OK;
    ov_ent *e = malloc(cap * sizeof *e);
    ov_ent **c = malloc(cap * sizeof *c);
    if (!e || !c) {
        free(e);
        free(c);
        return ENOMEM;
    }
    uint32_t seen = 0;
    for (uint32_t i = 0; i < st->ov_slots && seen < st->ov_count; i++)
        if (st->ov[i].used && (++seen, st->ov[i].seq <= max_seq))
            c[m++] = &st->ov[i];
    /* Superseded entries go with their successors: each is older than its block's entry in
     * the table, so a batch that takes that one takes it too, and apply's (vol, lba, seq)
     * order puts it first. */
    for (uint32_t i = 0; i < st->ov_nprev; i++)
        if (st->ov_prev[i].seq <= max_seq)
            c[m++] = &st->ov_prev[i];
    if (m > limit && limit > 0) {
        /* The first limit in map order (c[limit - 1] the greatest of them), then the rest of
         * that block's chain, which can only be among the ones after. */
        select_kth(c, m, limit - 1);
        const ov_ent *last = c[limit - 1];
        size_t k = limit;
        for (size_t j = limit; j < m; j++)
            if (c[j]->vol == last->vol && c[j]->lba == last->lba) {
                ov_ent *t = c[k];
                c[k++] = c[j];
                c[j] = t;
            }
        *more = k < m;
        m = k;
    }
    for (size_t i = 0; i < m; i++) {
        c[i]->taken = 1;
        e[i] = *c[i];
        if (c[i] >= st->ov && c[i] < st->ov + st->ov_slots)
            st->ov_ntaken++;
    }
    free(c);
    *n = m;
    *out = e;
    return XM_OK;
}

static int take_all(xm_store *st, ov_ent **out, size_t *n)
{
    int more;
    return take_upto(st, out, n, UINT64_MAX, SIZE_MAX, &more);
}

static void synced(xm_store *st, uint64_t covered)
{
    pthread_mutex_lock(&st->ov_mu);
    if (covered > st->synced_seq)
        st->synced_seq = covered;
    pthread_mutex_unlock(&st->ov_mu);
}

/* Apply the taken entries in t: data first (fdatasync, unless an earlier one covered them all),
 * then the map. */
static int apply_taken(xm_store *st, MDB_txn *t, ov_ent *e, size_t n)
{
    uint64_t top = 0;
    for (size_t i = 0; i < n; i++)
        top = e[i].seq > top ? e[i].seq : top;
    pthread_mutex_lock(&st->ov_mu);
    int need = top > st->synced_seq;
    pthread_mutex_unlock(&st->ov_mu);
    if (n == 0)
        return XM_OK;
    if (need) {
        if (fdatasync(st->pool_fd) != 0)
            return errno;
        synced(st, top);
    }
    size_t done;
    return apply(st, t, e, n, 0, &done);
}

int xm_wtxn_begin(xm_store *st, MDB_txn **out)
{
    ov_ent *e;
    size_t n;
    if (xm_batch_keep_taken(st)) { /* a snapshot's (xm_batch_life.c) */
        int krc = xm_space_check(st, XM_SPACE_ANY);
        return krc ? krc : xm_wtxn_begin_keep(st, out);
    }
    /* A full filesystem: refused before LMDB touches a page (xm_space.c); what frees space
     * keeps a reserve.  (Batches of acknowledged writes are never refused here.) */
    int rc = xm_space_check(st, XM_SPACE_ANY);
    if (rc)
        return rc;
    rc = xm_rc(mdb_txn_begin(st->env, NULL, 0, out));
    if (rc)
        return rc;
    pthread_mutex_lock(&st->ov_mu);
    st->ov_foreign = 1; /* no entry is published from now on: in-flight ones come back */
    while (st->ov_inflight)
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    st->nresv = 0; /* this transaction may allocate anything FREE */
    st->resv_blocks = 0;
    st->held_valid = 0; /* ... so the next reservation looks at the overlay afresh */
    rc = take_all(st, &e, &n);
    st->ov_txn = *out;
    pthread_mutex_unlock(&st->ov_mu);
    if (rc == XM_OK)
        rc = apply_taken(st, *out, e, n);
    free(e);
    if (rc) {
        mdb_txn_abort(*out);
        xm_wtxn_end(st, 0);
    }
    return rc;
}

void xm_wtxn_end(xm_store *st, int committed)
{
    pthread_mutex_lock(&st->ov_mu);
    ov_settle(st, committed);
    st->ov_foreign = 0;
    st->ov_txn = NULL;
    st->ov_gen++;
    pthread_cond_broadcast(&st->ov_cv);
    pthread_mutex_unlock(&st->ov_mu);
    if (committed) {
        xm_commit_done(st);
        xm_space_after_commit(st); /* keep data.mdb's headroom */
    }
}

/* Apply the overlay in a transaction of its own (the committer, xm_sync, a full overlay).
 * preempt: the committer's and a writer's (a full overlay, or an entry that survived a
 * snapshot: neither promises anything); xm_sync's must apply every entry published before the
 * FLUSH, a read's every entry it may read. */
static int batch_commit(xm_store *st, int preempt)
{
    MDB_txn *t;
    ov_ent *e;
    size_t n;
    /* Nothing to do, or a foreign write transaction is open: it applied the overlay itself
     * and nothing can be published until it ends; it may be this thread's (a sync from inside
     * a transaction), which must not wait for LMDB's writer lock. */
    pthread_mutex_lock(&st->ov_mu);
    int idle = (st->ov_count == 0 && st->ov_nprev == 0) || st->ov_foreign;
    pthread_mutex_unlock(&st->ov_mu);
    if (idle)
        return XM_OK;
    /* The data first, holding no lock: entries published before it began are covered, and
     * neither writers nor the next snapshot wait behind this fdatasync.  (xm_sync's own
     * fdatasync may already cover them.) */
    pthread_mutex_lock(&st->ov_mu);
    uint64_t covered = st->ov_seq;
    int need = covered > st->synced_seq;
    pthread_mutex_unlock(&st->ov_mu);
    if (need) {
        if (fdatasync(st->pool_fd) != 0)
            return errno;
        synced(st, covered);
    }
    /* A preemptible batch commits in transactions of at most APPLY_TXN entries, consecutive
     * in map order (so they dirty different leaves), and stops between two when a snapshot
     * waits: the snapshot then waits for at most one such transaction's apply chunk or its
     * msync, and an abort loses at most one transaction's work (with one transaction per
     * batch, a 250 ms batch's commit made snapshots under load wait up to ~0.5 s).  A FLUSH's
     * or a read's is one transaction: it must apply everything it covers anyway. */
    int rc = XM_OK, more = 1;
    while (rc == XM_OK && more) {
        pthread_mutex_lock(&st->apply_mu);
        if ((rc = xm_rc(mdb_txn_begin(st->env, NULL, 0, &t)))) {
            pthread_mutex_unlock(&st->apply_mu);
            break;
        }
        pthread_mutex_lock(&st->ov_mu);
        rc = take_upto(st, &e, &n, covered, preempt ? APPLY_TXN : SIZE_MAX, &more);
        pthread_mutex_unlock(&st->ov_mu);
        if (rc == XM_OK && n == 0) {
            mdb_txn_abort(t);
            pthread_mutex_lock(&st->ov_mu);
            ov_settle(st, 0);
            pthread_mutex_unlock(&st->ov_mu);
            pthread_mutex_unlock(&st->apply_mu);
            break;
        }
        size_t done = 0;
        if (rc == XM_OK)
            rc = apply(st, t, e, n, preempt, &done); /* their data is durable: the fdatasync above */
        /* Preempted by a snapshot (done < n): abort, do not commit what was applied.  A commit
         * would make the snapshot wait for the msync of every page the transaction dirtied;
         * an abort is immediate (LMDB wrote only pages that were free) and every entry it
         * took is pending again, for the next batch.  The cost: at most one transaction's
         * apply CPU per snapshot that lands in one. */
        int aborted = rc == XM_OK && done < n;
        if (rc || aborted)
            mdb_txn_abort(t);
        else
            rc = xm_rc(mdb_txn_commit(t));
        pthread_mutex_lock(&st->ov_mu);
        free(e);
        ov_settle(st, rc == XM_OK && !aborted);
        st->ov_gen++;
        pthread_cond_broadcast(&st->ov_cv);
        pthread_mutex_unlock(&st->ov_mu);
        pthread_mutex_unlock(&st->apply_mu);
        if (rc == XM_OK && !aborted) {
            xm_commit_done(st);
            xm_space_after_commit(st);
        }
        if (aborted || (preempt && __atomic_load_n(&st->snap_want, __ATOMIC_ACQUIRE)))
            break;
    }
    return rc;
}

int xm_batch_commit(xm_store *st)
{
    return batch_commit(st, 0);
}

int xm_batch_commit_preemptible(xm_store *st)
{
    return batch_commit(st, 1);
}

int xm_batch_sync_data(xm_store *st)
{
    pthread_mutex_lock(&st->ov_mu);
    uint64_t covered = st->ov_seq;
    pthread_mutex_unlock(&st->ov_mu);
    if (fdatasync(st->pool_fd) != 0)
        return errno;
    synced(st, covered);
    return XM_OK;
}

int xm_pool_datasync(xm_store *st)
{
    return fdatasync(st->pool_fd) == 0 ? XM_OK : errno;
}

int xm_batch_before_read(xm_store *st)
{
    return xm_batch_commit(st);
}
