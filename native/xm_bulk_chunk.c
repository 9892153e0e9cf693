/*
 * xm_bulk_chunk.c - one chunk of a bulk walk (xm_bulk.c, xm_bulk_rb.c, xm_bulk_clone.c): its
 * write transaction, its frees (allocator.release's twin: PENDING in key order, settled before
 * the commit) and, after the commit, the punch of what it freed.
 *
 * Durability: a chunk commits with MDB_NOMETASYNC's single map flush (xm_env.c), so a system
 * crash may undo the last chunk; the walks are resumable from what is committed (bulk.py's
 * marks), so that only redoes it.  The driver makes the operation durable (xm_env_sync) before
 * it replies, and a chunk that punches syncs first: a punched block must never be referenced
 * by a map that a crash could bring back.
 */
#include "xm_bulk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int freed_add(freed_list *f, uint64_t pbn, uint64_t len)
{
    if (f->n == f->cap) {
        size_t cap = f->cap ? 2 * f->cap : 256;
        void *p = realloc(f->run, cap * sizeof *f->run);
        if (!p)
            return ENOMEM;
        f->run = p;
        f->cap = cap;
    }
    f->run[f->n][0] = pbn;
    f->run[f->n][1] = len;
    f->n++;
    return XM_OK;
}

static uint64_t key_at(const uint8_t *p, size_t i, size_t es, size_t off)
{
    uint64_t k;
    memcpy(&k, p + i * es + off, sizeof k);
    return k;
}

void bk_radix_u64(void *v, void *tmp, size_t n, size_t es, size_t off)
{
    uint8_t *src = v, *dst = tmp;
    for (int shift = 0; shift < 64; shift += 8) {
        size_t count[257] = {0};
        for (size_t i = 0; i < n; i++)
            count[((key_at(src, i, es, off) >> shift) & 0xff) + 1]++;
        int skip = 0;
        for (int d = 1; d <= 256 && !skip; d++)
            skip = count[d] == n;
        if (skip)
            continue;
        for (int d = 1; d <= 256; d++)
            count[d] += count[d - 1];
        for (size_t i = 0; i < n; i++)
            memcpy(dst + count[(key_at(src, i, es, off) >> shift) & 0xff]++ * es, src + i * es, es);
        uint8_t *x = src;
        src = dst;
        dst = x;
    }
    if (src != v)
        memcpy(v, src, n * es);
}

int freed_sort(freed_list *f)
{
    size_t n = f->n, i;
    for (i = 1; i < n; i++) /* often sorted already (put_pending's output) */
        if (f->run[i - 1][0] > f->run[i][0] ||
            (f->run[i - 1][0] == f->run[i][0] && f->run[i - 1][1] > f->run[i][1]))
            break;
    if (i >= n)
        return XM_OK;
    void *tmp = malloc(n * sizeof *f->run);
    if (!tmp)
        return ENOMEM;
    /* by (pbn, len): the length's passes, then the pbn's (both stable) */
    bk_radix_u64(f->run, tmp, n, sizeof *f->run, sizeof f->run[0][0]);
    bk_radix_u64(f->run, tmp, n, sizeof *f->run, 0);
    free(tmp);
    return XM_OK;
}

/* The merged runs of f of at least min blocks: punched back to the filesystem when st is given
 * (twin of DataPath.punch; a punch failure is not an error of the walk: the blocks are free in
 * the allocator either way); returns whether there is any such run. */
static int merged_runs(xm_store *st, freed_list *f, uint64_t min)
{
    int any = 0;
    if (freed_sort(f))
        return 0; /* no memory to sort: punch nothing (the blocks are free anyway) */
    for (size_t i = 0; i < f->n;) {
        uint64_t a = f->run[i][0], b = a + f->run[i][1];
        for (i++; i < f->n && f->run[i][0] <= b; i++)
            if (f->run[i][0] + f->run[i][1] > b)
                b = f->run[i][0] + f->run[i][1];
        if (b - a >= min) {
            if (st == NULL)
                return 1;
            any = 1;
            (void)xm_pool_punch(st, a, b - a);
        }
    }
    return any;
}

static void freed_punch(xm_store *st, freed_list *f, uint64_t min)
{
    (void)merged_runs(st, f, min);
}

/* Would freed_punch punch anything? */
static int punchable(freed_list *f, uint64_t min)
{
    return f->n != 0 && merged_runs(NULL, f, min);
}

/* LMDB's key order for the default comparator (mdb_cmp_memn): bytes, then length. */
static int key_cmp(const MDB_val *a, const uint8_t *b, size_t bl)
{
    size_t m = a->mv_size < bl ? a->mv_size : bl;
    int d = memcmp(a->mv_data, b, m);
    return d ? d : (a->mv_size > bl) - (a->mv_size < bl);
}

int bk_cursor_del_next(MDB_cursor *cur, uint8_t *kb, size_t kl, MDB_val *k, MDB_val *v)
{
    int rc = mdb_cursor_del(cur, 0);
    if (rc)
        return rc;
    /* After mdb_cursor_del the cursor stands on the entry that followed (LMDB moves it to the
     * next page when the deleted one was a page's last; py-lmdb's Cursor.delete relies on the
     * same): one step instead of a new descent from the root.  Trusted only if it is past the
     * deleted key; otherwise (an emptied tree, the end) seek again from that key. */
    rc = mdb_cursor_get(cur, k, v, MDB_GET_CURRENT);
    if (rc == 0 && key_cmp(k, kb, kl) > 0)
        return 0;
    *k = (MDB_val){kl, kb};
    return mdb_cursor_get(cur, k, v, MDB_SET_RANGE);
}

/* ---- the chunk's frees: PENDING, META `seq` and `blocks` (allocator.release's twin) ---- */

static int meta_get_u64(chunk *c, const char *name, uint64_t *out)
{
    const uint8_t *p;
    int rc = bk_get_fixed(c->st, c->t, c->st->dbi[XM_DB_META], name, strlen(name), XM_U64_LEN, &p);
    *out = 0;
    if (rc == XM_OK)
        *out = xm_get_le64(p);
    return rc == XM_ENOTFOUND ? XM_OK : rc;
}

/* META blocks (free, pending): pending += n (allocator._add_totals). */
static int add_pending(chunk *c, uint64_t n)
{
    const uint8_t *p;
    uint8_t b[XM_U64X2_LEN];
    uint64_t f = 0, pend = 0;
    int rc = bk_get_fixed(c->st, c->t, c->st->dbi[XM_DB_META], XM_META_BLOCKS,
                          strlen(XM_META_BLOCKS), XM_U64X2_LEN, &p);
    if (rc == XM_OK) {
        f = xm_get_le64(p);
        pend = xm_get_le64(p + 8);
    } else if (rc != XM_ENOTFOUND) {
        return rc;
    }
    xm_put_le64(b, f);
    xm_put_le64(b + 8, pend + n);
    return bk_put(c->t, c->st->dbi[XM_DB_META], XM_META_BLOCKS, strlen(XM_META_BLOCKS), b, sizeof b);
}

/* This transaction's seq for its frees (allocator._txn_seq): META seq + 1, stored once. */
static int txn_seq(chunk *c)
{
    uint64_t seq;
    uint8_t v[XM_U64_LEN];
    int rc;
    if (c->seq != 0)
        return XM_OK;
    if ((rc = meta_get_u64(c, "seq", &seq)))
        return rc;
    c->seq = seq + 1;
    xm_put_le64(v, c->seq);
    return bk_put(c->t, c->st->dbi[XM_DB_META], "seq", 3, v, XM_U64_LEN);
}

/* A free piece: to PENDING under this transaction's seq (allocator.release), put by
 * bk_settle in key order; the same entries as putting it now (merged only after
 * bk_release_later, whose twin merges too). */
static int pend(chunk *c, uint64_t start, uint64_t stop)
{
    return freed_add(&c->pendq, start, stop - start);
}

/* Is REFS empty in this transaction?  Then no block has a second holder and a release is a
 * plain free: no cursor seek (mdb_stat reads the transaction's copy of the DB record, O(1)). */
static int refs_empty(chunk *c)
{
    MDB_stat ms;
    return mdb_stat(c->t, c->st->dbi[XM_DB_REFS], &ms) == 0 && ms.ms_entries == 0;
}

/* Twin of allocator.release: one record no longer holds [pbn, pbn+n) (n <= XM_MAX_EXTENT). */
int bk_release(chunk *c, uint64_t pbn, uint64_t n)
{
    refs_run runs[XM_MAX_EXTENT + 1];
    size_t nr = 0;
    uint64_t end = pbn + n, pos = pbn;
    int rc = refs_empty(c) ? XM_OK
                           : bk_refs_overlapping(c, pbn, end, runs, XM_MAX_EXTENT + 1, &nr);
    for (size_t i = 0; i < nr && rc == XM_OK && pos < end; i++) { /* allocator._split */
        const refs_run *r = &runs[i];
        if (r->s > pos) {
            uint64_t stop = r->s < end ? r->s : end;
            rc = pend(c, pos, stop);
            pos = stop;
        }
        if (rc || pos >= end)
            break;
        uint64_t stop = r->s + r->len < end ? r->s + r->len : end;
        if (stop > pos) {
            rc = bk_set_refs(c, r, pos, stop, r->refs - 1);
            pos = stop;
        }
    }
    if (rc == XM_OK && pos < end)
        rc = pend(c, pos, end);
    return rc;
}

int bk_release_own(chunk *c, uint64_t pbn, uint64_t n)
{
    return pend(c, pbn, pbn + n);
}

int bk_release_later(chunk *c, uint64_t pbn, uint64_t n)
{
    c->merge = 1;
    return freed_add(&c->later, pbn, n);
}

/* The PENDING puts: pendq sorted (merged where adjacent if c->merge) and appended: this
 * chunk's seq is new, so its keys sort after every existing one and MDB_APPEND fills pages in
 * order instead of searching and splitting (a plain put if LMDB says otherwise).  A block
 * freed twice is a damaged map. */
static int put_pending(chunk *c)
{
    freed_list *p = &c->pendq;
    MDB_cursor *cur = NULL;
    uint64_t total = 0;
    int rc = freed_sort(p);
    if (rc == XM_OK && (rc = txn_seq(c)) == XM_OK)
        rc = xm_rc(mdb_cursor_open(c->t, c->st->dbi[XM_DB_PENDING], &cur));
    for (size_t i = 0; i < p->n && rc == XM_OK;) {
        uint64_t a = p->run[i][0], b = a + p->run[i][1];
        if (i + 1 < p->n && p->run[i + 1][0] < b)
            rc = XM_ECORRUPT;
        for (i++; c->merge && rc == XM_OK && i < p->n && p->run[i][0] == b; i++) {
            b += p->run[i][1];
            if (i + 1 < p->n && p->run[i + 1][0] < b)
                rc = XM_ECORRUPT;
        }
        if (rc)
            break;
        uint8_t kb[16], vb[XM_U64_LEN];
        xm_put_be64(kb, c->seq);
        xm_put_be64(kb + 8, a);
        xm_put_le64(vb, b - a);
        MDB_val k = {sizeof kb, kb}, v = {sizeof vb, vb};
        OP();
        rc = mdb_cursor_put(cur, &k, &v, MDB_APPEND);
        if (rc == MDB_KEYEXIST)
            rc = mdb_cursor_put(cur, &k, &v, 0);
        if ((rc = xm_rc(rc)) == XM_OK) {
            total += b - a;
            rc = freed_add(&c->freed, a, b - a);
        }
    }
    if (cur)
        mdb_cursor_close(cur);
    p->n = 0;
    return rc == XM_OK ? add_pending(c, total) : rc;
}

int bk_settle(chunk *c)
{
    int rc = freed_sort(&c->later);
    for (size_t i = 0; i < c->later.n && rc == XM_OK; i++) /* pbn order: REFS pages in order */
        rc = bk_release(c, c->later.run[i][0], c->later.run[i][1]);
    c->later.n = 0;
    if (rc == XM_OK && c->pendq.n)
        rc = put_pending(c);
    return rc;
}

/* ---- the chunk's transaction --------------------------------------------------------- */

int bk_begin(chunk *c, xm_store *st)
{
    memset(c, 0, sizeof *c);
    c->st = st;
    return xm_wtxn_begin(st, &c->t);
}

/* Before the transaction ends: LMDB frees a write transaction's cursors with it. */
static void close_cursors(chunk *c)
{
    for (int db = 0; db < XM_DB_COUNT; db++)
        if (c->cur[db])
            mdb_cursor_close(c->cur[db]);
    memset(c->cur, 0, sizeof c->cur);
}

void bk_forget(chunk *c)
{
    close_cursors(c);
    free(c->freed.run);
    free(c->later.run);
    free(c->pendq.run);
    c->freed = c->later = c->pendq = (freed_list){0};
}

/* Commit (rc == XM_OK) or abort, punch what the committed chunk freed, free the list. */
int bk_end(chunk *c, int rc, uint64_t punch_min)
{
    if (rc == XM_OK)
        rc = bk_settle(c);
    close_cursors(c);
    /* The punch guard (xm.h), from before the commit: the frees are in PENDING from then on,
     * and a FLUSH that makes them FREE must not do so before the punch is done. */
    int punch = rc == XM_OK && punchable(&c->freed, punch_min);
    if (punch)
        xm_punch_hold(c->st);
    if (rc == XM_OK)
        rc = xm_rc(mdb_txn_commit(c->t));
    else
        mdb_txn_abort(c->t);
    xm_wtxn_end(c->st, rc == XM_OK); /* group commit's settle; data.mdb's headroom */
    if (rc == XM_OK && punch) {
        /* The commit is MDB_NOMETASYNC: a system crash could undo it, and the undone map
         * would still point at the punched blocks.  Durable first. */
        rc = xm_env_sync(c->st);
        if (rc == XM_OK)
            freed_punch(c->st, &c->freed, punch_min);
    }
    if (punch)
        xm_punch_release(c->st);
    bk_forget(c); /* the lists (pendq's too: it leaked a chunk's PENDING list before) */
    return rc;
}
