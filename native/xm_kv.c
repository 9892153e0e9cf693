/*
 * xm_kv.c - the key/value API the Python engine builds its metadata operations on
 * (transactions, get/put/del, cursors) and the live-map scan the hot path shares with it.
 *
 * Damaged metadata: LMDB checks little inside a page, so a damaged page can hand out a key or
 * value whose size runs past the map.  Everything returned to a caller is checked to lie inside
 * the map first (XM_ECORRUPT otherwise), so that neither C nor Python ever reads outside it, and
 * every record the C core decodes is validated (xm_layout.h).
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int db_ok(int db)
{
    return db >= 0 && db < XM_DB_COUNT;
}

int xm_txn_begin(xm_store *st, int write, xm_txn **out)
{
    xm_txn *t = malloc(sizeof *t);
    if (!t)
        return ENOMEM;
    t->st = st;
    t->write = write == 1;
    int rc;
    if (write == 0 && (rc = xm_batch_before_read(st))) {
        free(t);
        return rc;
    }
    /* xm_wtxn_begin: group commit's hook (xm_batch.c), with the full-filesystem check */
    rc = t->write ? xm_wtxn_begin(st, &t->txn) : mdb_txn_begin(st->env, NULL, MDB_RDONLY, &t->txn);
    if (rc) {
        free(t);
        return xm_rc(rc);
    }
    *out = t;
    return XM_OK;
}

int xm_txn_commit_deferred(xm_txn *t)
{
    int rc = mdb_txn_commit(t->txn);
    if (t->write)
        xm_wtxn_end(t->st, rc == 0); /* (xm_space_after_commit, xm_commit_done are in there) */
    free(t);
    return xm_rc(rc);
}

/* A write transaction from Python is durable when this returns (MDB_NOMETASYNC: the commit
 * alone may be undone by a system crash; xm_env_sync makes it durable).  Same cost as an
 * LMDB synced commit: two flushes of the map. */
int xm_txn_commit(xm_txn *t)
{
    xm_store *st = t->st;
    int write = t->write;
    int rc = xm_txn_commit_deferred(t);
    if (rc == XM_OK && write)
        rc = xm_env_sync(st);
    return rc;
}

void xm_txn_abort(xm_txn *t)
{
    mdb_txn_abort(t->txn);
    if (t->write)
        xm_wtxn_end(t->st, 0);
    free(t);
}

/* Hand an LMDB value out, if it lies inside the map. */
static int give(const xm_store *st, const MDB_val *v, xm_val *out)
{
    if (v->mv_size && !xm_in_map(st, v->mv_data, v->mv_size))
        return XM_ECORRUPT;
    out->data = v->mv_data;
    out->len = v->mv_size;
    return XM_OK;
}

int xm_get(xm_txn *t, int db, const void *key, size_t klen, xm_val *val)
{
    if (!db_ok(db))
        return EINVAL;
    MDB_val k = {klen, (void *)key}, v;
    int rc = mdb_get(t->txn, t->st->dbi[db], &k, &v);
    return rc ? xm_rc(rc) : give(t->st, &v, val);
}

int xm_put(xm_txn *t, int db, const void *key, size_t klen, const void *val, size_t vlen)
{
    if (!db_ok(db))
        return EINVAL;
    MDB_val k = {klen, (void *)key}, v = {vlen, (void *)val};
    return xm_rc(mdb_put(t->txn, t->st->dbi[db], &k, &v, 0));
}

int xm_del(xm_txn *t, int db, const void *key, size_t klen)
{
    if (!db_ok(db))
        return EINVAL;
    MDB_val k = {klen, (void *)key};
    return xm_rc(mdb_del(t->txn, t->st->dbi[db], &k, NULL));
}

int xm_del_prefix(xm_txn *t, int db, const void *prefix, size_t plen, uint64_t *count)
{
    MDB_cursor *c;
    *count = 0;
    if (!db_ok(db))
        return EINVAL;
    int rc = mdb_cursor_open(t->txn, t->st->dbi[db], &c);
    if (rc)
        return xm_rc(rc);
    uint64_t n = 0;
    for (;;) {
        MDB_val k = {plen, (void *)prefix}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND) {
            rc = XM_OK;
            break;
        }
        if (rc)
            break;
        if (!xm_in_map(t->st, k.mv_data, k.mv_size)) {
            rc = XM_ECORRUPT;
            break;
        }
        if (k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0)
            break;
        if ((rc = mdb_cursor_del(c, 0)))
            break;
        n++;
    }
    mdb_cursor_close(c);
    *count = n;
    return xm_rc(rc);
}

int xm_cur_open(xm_txn *t, int db, xm_cur **out)
{
    if (!db_ok(db))
        return EINVAL;
    xm_cur *c = malloc(sizeof *c);
    if (!c)
        return ENOMEM;
    c->st = t->st;
    int rc = mdb_cursor_open(t->txn, t->st->dbi[db], &c->cur);
    if (rc) {
        free(c);
        return xm_rc(rc);
    }
    *out = c;
    return XM_OK;
}

void xm_cur_close(xm_cur *c)
{
    mdb_cursor_close(c->cur);
    free(c);
}

int xm_cur_get(xm_cur *c, int op, const void *key, size_t klen, xm_val *kout, xm_val *vout)
{
    static const MDB_cursor_op ops[] = {MDB_FIRST, MDB_LAST, MDB_NEXT, MDB_PREV,
                                        MDB_SET_RANGE, MDB_SET_KEY, MDB_GET_CURRENT};
    if (op < 0 || op > XM_GET_CURRENT)
        return EINVAL;
    MDB_val k = {klen, (void *)key}, v = {0, NULL};
    STAT_ADD(c->st, cursor_steps, 1);
    int rc = mdb_cursor_get(c->cur, &k, &v, ops[op]);
    if (rc)
        return xm_rc(rc);
    if ((rc = give(c->st, &k, kout)))
        return rc;
    return give(c->st, &v, vout);
}

int xm_cur_del(xm_cur *c)
{
    return xm_rc(mdb_cursor_del(c->cur, 0));
}

/* ---- live-map scans ------------------------------------------------------------------ */

/* A LIVE record: *mine says whether it is vol's (a scan stops at the first that is not). */
static int decode_live(const xm_store *st, const MDB_val *k, const MDB_val *v, uint32_t vol,
                       xm_extent *e, int *mine)
{
    if (k->mv_size != XM_LIVE_KEY_LEN || !xm_in_map(st, k->mv_data, k->mv_size))
        return XM_ECORRUPT;
    const uint8_t *p = k->mv_data;
    *mine = xm_get_be32(p) == vol;
    if (!*mine)
        return XM_OK;
    xm_rec r;
    if (!xm_in_map(st, v->mv_data, v->mv_size) || xm_rec_decode(v->mv_data, v->mv_size, &r))
        return XM_ECORRUPT;
    uint64_t lba = xm_get_be64(p + 4);
    if (lba > UINT64_MAX / XM_BLOCK_SIZE - r.len)
        return XM_ECORRUPT;
    *e = (xm_extent){lba, r.pbn, r.epoch, r.len, r.flags};
    return XM_OK;
}

int xm_scan_live(xm_store *st, MDB_cursor *c, uint32_t vol, uint64_t lo, uint64_t hi,
                 xm_extent *out, size_t cap, size_t *nout, int *more)
{
    uint8_t kb[XM_LIVE_KEY_LEN];
    xm_key_live(kb, vol, lo);
    MDB_val k = {sizeof kb, kb}, v;
    size_t n = 0;
    int mine, rc;
    *more = 0;
    *nout = 0;
    STAT_ADD(st, cursor_steps, 1);
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    int at_end = rc == MDB_NOTFOUND;
    if (rc && !at_end)
        return xm_rc(rc);
    /* The record before the first one at or after lo may reach into the range. */
    xm_extent e;
    int first_is_lo = 0;
    if (!at_end) {
        if ((rc = decode_live(st, &k, &v, vol, &e, &mine)))
            return rc;
        first_is_lo = mine && e.lba == lo;
    }
    if (!first_is_lo) {
        MDB_val pk, pv;
        STAT_ADD(st, cursor_steps, 1);
        rc = mdb_cursor_get(c, &pk, &pv, at_end ? MDB_LAST : MDB_PREV);
        if (rc == XM_OK) {
            if ((rc = decode_live(st, &pk, &pv, vol, &e, &mine)))
                return rc;
            STAT_ADD(st, records_read, 1);
            if (mine && e.lba + e.len > lo && e.lba < hi && cap > 0)
                out[n++] = e;
        } else if (rc != MDB_NOTFOUND) {
            return xm_rc(rc);
        }
        if (at_end) {
            *nout = n;
            return XM_OK;
        }
        /* Back to the first record at or after lo. */
        STAT_ADD(st, cursor_steps, 1);
        if (rc == XM_OK)
            rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        else
            rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
        if (rc) {
            *nout = n;
            return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
        }
    }
    for (;;) {
        if ((rc = decode_live(st, &k, &v, vol, &e, &mine)))
            return rc;
        if (!mine || e.lba >= hi)
            break;
        STAT_ADD(st, records_read, 1);
        if (n > 0 && e.lba < out[n - 1].lba + out[n - 1].len)
            return XM_ECORRUPT; /* overlapping records: a damaged map */
        if (n >= cap) {
            *more = 1;
            break;
        }
        out[n++] = e;
        STAT_ADD(st, cursor_steps, 1);
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        if (rc == MDB_NOTFOUND)
            break;
        if (rc)
            return xm_rc(rc);
    }
    *nout = n;
    return XM_OK;
}

int xm_live_overlap(xm_txn *t, uint32_t vol, uint64_t lba, uint64_t nblocks,
                    xm_extent *out, size_t cap, size_t *nout)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(t->txn, t->st->dbi[XM_DB_LIVE], &c);
    if (rc)
        return xm_rc(rc);
    int more;
    uint64_t lo = lba > 0 ? lba - 1 : 0;
    rc = xm_scan_live(t->st, c, vol, lo, lba + nblocks + 1, out, cap, nout, &more);
    mdb_cursor_close(c);
    if (rc == XM_OK && more)
        rc = XM_ESPACE;
    return rc;
}

/* ---- a snapshot's view (extmap.view_at) ---------------------------------------------------
 * The live records born by epoch plus the dead records with birth <= epoch < death, over
 * [lo, hi), sorted by lba (records visible at one epoch never overlap), not clipped.  One copy
 * for the clone's steps (xm_bulk_clone.c, counted in xm_bulk_ops through nops) and the
 * backup's multi-piece read (xm_multiread.c). */
#define VIEW_OP() (nops ? (void)__atomic_fetch_add(nops, 1, __ATOMIC_RELAXED) : (void)0)

static int view_cmp_lba(const void *a, const void *b)
{
    const xm_extent *x = a, *y = b;
    return x->lba < y->lba ? -1 : x->lba > y->lba;
}

static int view_push(xm_extent **v, size_t *m, size_t *cap, xm_extent e)
{
    if (*m == *cap) {
        xm_extent *p = realloc(*v, 2 * *cap * sizeof *p);
        if (!p)
            return ENOMEM;
        *v = p;
        *cap *= 2;
    }
    (*v)[(*m)++] = e;
    return XM_OK;
}

int xm_snap_view(xm_store *st, MDB_txn *t, uint32_t vol, uint64_t epoch, uint64_t lo,
                 uint64_t hi, xm_extent **out, size_t *n, uint64_t *nops)
{
    size_t cap = 256, nl = 0, m = 0;
    int more = 0, rc;
    xm_extent *v = NULL;
    MDB_cursor *cur;
    if ((rc = mdb_cursor_open(t, st->dbi[XM_DB_LIVE], &cur)))
        return xm_rc(rc);
    for (;;) {
        free(v);
        if (!(v = malloc(cap * sizeof *v))) {
            mdb_cursor_close(cur);
            return ENOMEM;
        }
        VIEW_OP();
        if ((rc = xm_scan_live(st, cur, vol, lo, hi, v, cap, &nl, &more)) || !more)
            break;
        cap *= 4;
    }
    mdb_cursor_close(cur);
    for (size_t i = 0; i < nl; i++)
        if (v[i].birth <= epoch && v[i].lba < hi && v[i].lba + v[i].len > lo)
            v[m++] = v[i];
    if (rc == XM_OK && (rc = mdb_cursor_open(t, st->dbi[XM_DB_DEAD], &cur)))
        rc = xm_rc(rc);
    if (rc) {
        free(v);
        return rc;
    }
    uint8_t kb[XM_TRIPLE_KEY_LEN], stop[XM_TRIPLE_KEY_LEN];
    xm_key_triple(kb, vol, lo > XM_MAX_EXTENT - 1 ? lo - XM_MAX_EXTENT + 1 : 0, 0);
    xm_key_triple(stop, vol, hi, 0);
    MDB_val k = {sizeof kb, kb}, val;
    rc = mdb_cursor_get(cur, &k, &val, MDB_SET_RANGE);
    while (rc == 0) {
        VIEW_OP();
        if (k.mv_size != XM_TRIPLE_KEY_LEN || memcmp(k.mv_data, stop, sizeof stop) >= 0)
            break;
        xm_rec r;
        if (!xm_in_map(st, val.mv_data, val.mv_size) || xm_rec_decode(val.mv_data, val.mv_size, &r)) {
            rc = XM_ECORRUPT;
            break;
        }
        uint64_t lba = xm_get_be64((const uint8_t *)k.mv_data + 4);
        uint64_t birth = xm_get_be64((const uint8_t *)k.mv_data + 12);
        if (birth <= epoch && epoch < r.epoch && lba + r.len > lo &&
            (rc = view_push(&v, &m, &cap, (xm_extent){lba, r.pbn, birth, r.len, r.flags})))
            break;
        rc = mdb_cursor_get(cur, &k, &val, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    if (rc != 0 && rc != MDB_NOTFOUND) {
        free(v);
        return rc == ENOMEM || rc == XM_ECORRUPT ? rc : xm_rc(rc);
    }
    qsort(v, m, sizeof *v, view_cmp_lba);
    *out = v;
    *n = m;
    return XM_OK;
}

#undef VIEW_OP
