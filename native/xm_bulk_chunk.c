/*
 * xm_bulk_chunk.c - one chunk of a bulk walk (xm_bulk.c, xm_bulk_rb.c, xm_bulk_clone.c): its
 * write transaction and, after the commit, the punch of what it freed.
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

int freed_sort(freed_list *f)
{
    size_t n = f->n, i;
    for (i = 1; i < n; i++) /* often sorted already (put_pending's output) */
        if (f->run[i - 1][0] > f->run[i][0] ||
            (f->run[i - 1][0] == f->run[i][0] && f->run[i - 1][1] > f->run[i][1]))
            break;
    if (i >= n)
        return XM_OK;
    uint64_t (*tmp)[2] = malloc(n * sizeof *tmp), (*src)[2] = f->run, (*dst)[2] = tmp;
    if (!tmp)
        return ENOMEM;
    /* Stable byte passes, least significant first: the length's, then the pbn's; a pass whose
     * byte is the same in every run is skipped. */
    for (int pass = 0; pass < 16; pass++) {
        int w = pass < 8 ? 1 : 0, shift = (pass % 8) * 8;
        size_t count[257] = {0};
        for (i = 0; i < n; i++)
            count[((src[i][w] >> shift) & 0xff) + 1]++;
        int skip = 0;
        for (int d = 1; d <= 256 && !skip; d++)
            skip = count[d] == n;
        if (skip)
            continue;
        for (int d = 1; d <= 256; d++)
            count[d] += count[d - 1];
        for (i = 0; i < n; i++) {
            size_t at = count[(src[i][w] >> shift) & 0xff]++;
            dst[at][0] = src[i][0];
            dst[at][1] = src[i][1];
        }
        uint64_t (*x)[2] = src;
        src = dst;
        dst = x;
    }
    if (src != f->run)
        memcpy(f->run, src, n * sizeof *src);
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

int bk_begin(chunk *c, xm_store *st)
{
    memset(c, 0, sizeof *c);
    c->st = st;
    return xm_wtxn_begin(st, &c->t);
}

/* Commit (rc == XM_OK) or abort, punch what the committed chunk freed, free the list. */
int bk_end(chunk *c, int rc, uint64_t punch_min)
{
    if (rc == XM_OK)
        rc = bk_settle(c);
    for (int db = 0; db < XM_DB_COUNT; db++)
        if (c->cur[db])
            mdb_cursor_close(c->cur[db]);
    if (rc == XM_OK)
        rc = xm_rc(mdb_txn_commit(c->t));
    else
        mdb_txn_abort(c->t);
    xm_wtxn_end(c->st, rc == XM_OK); /* group commit's settle; data.mdb's headroom */
    if (rc == XM_OK && punchable(&c->freed, punch_min)) {
        /* The commit is MDB_NOMETASYNC: a system crash could undo it, and the undone map
         * would still point at the punched blocks.  Durable first. */
        rc = xm_env_sync(c->st);
        if (rc == XM_OK)
            freed_punch(c->st, &c->freed, punch_min);
    }
    free(c->freed.run);
    free(c->later.run);
    return rc;
}
