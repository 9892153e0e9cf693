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

static int cmp_run(const void *a, const void *b)
{
    uint64_t x = ((const uint64_t *)a)[0], y = ((const uint64_t *)b)[0];
    return x < y ? -1 : x > y;
}

/* The merged runs of f of at least min blocks: punched back to the filesystem when st is given
 * (twin of DataPath.punch; a punch failure is not an error of the walk: the blocks are free in
 * the allocator either way); returns whether there is any such run. */
static int merged_runs(xm_store *st, freed_list *f, uint64_t min)
{
    int any = 0;
    qsort(f->run, f->n, sizeof *f->run, cmp_run);
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
    return rc;
}
