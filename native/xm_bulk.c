/*
 * xm_bulk.c - the bulk metadata walks in C: one bounded chunk per call.
 *
 * Snapshot delete (the dead-list walk through DEADIDX and the frees) and volume delete (every
 * record of the volume released) run as a sequence of chunks; each call here is ONE write
 * transaction (begun through xm_wtxn_begin, committed before return) that changes at most `limit`
 * map records, so LMDB's writer lock is held for a few milliseconds and the I/O gate not at all:
 * the records these walks touch are invisible to every reader (a deleted snapshot's window, a
 * deleted volume), so no reader can be affected.  The driver (snapdisk/bulk.py) commits a mark
 * before the first chunk and finishes any marked work at open, so a crash between chunks is
 * resumed from what is committed: the walks take what is left, never a saved position.
 *
 * Each function is the twin of a Python function in extmap.py / allocator.py (named below), with
 * the same order of database operations, so that the same chunks leave byte-identical databases
 * (tests/test_extmap_diff.py dumps and compares every database).  Encodings: xm_layout.h.
 *
 * Blocks freed by a chunk go to PENDING under the chunk's seq (allocator.release) and, after the
 * commit, merged runs of at least `punch_min` blocks are punched out of the pool file (like
 * volume.DataPath.punch).  A chunk's transaction and its punch: xm_bulk_chunk.c.
 */
#include "xm_bulk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Key/value operations done by the walks (gets, puts, deletes, cursor positionings): the
 * counted work of tests/test_work.py, comparable to the Python twins' Txn.ops.  Process-wide:
 * one store is open per process. */
uint64_t xm_bulk_nops;

uint64_t xm_bulk_ops(void)
{
    return __atomic_load_n(&xm_bulk_nops, __ATOMIC_RELAXED);
}

int bk_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl)
{
    OP();
    MDB_val key = {kl, (void *)k}, val = {vl, (void *)v};
    return xm_rc(mdb_put(t, d, &key, &val, 0));
}

int bk_del(MDB_txn *t, MDB_dbi d, const void *k, size_t kl)
{
    MDB_val key = {kl, (void *)k};
    OP();
    int rc = mdb_del(t, d, &key, NULL);
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

static int chunk_cursor(chunk *c, int db, MDB_cursor **out)
{
    if (!c->cur[db]) {
        int rc = mdb_cursor_open(c->t, c->st->dbi[db], &c->cur[db]);
        if (rc)
            return xm_rc(rc);
    }
    *out = c->cur[db];
    return XM_OK;
}

int bk_cput(chunk *c, int db, const void *k, size_t kl, const void *v, size_t vl)
{
    MDB_cursor *cur;
    MDB_val key = {kl, (void *)k}, val = {vl, (void *)v};
    int rc = chunk_cursor(c, db, &cur);
    OP();
    return rc ? rc : xm_rc(mdb_cursor_put(cur, &key, &val, 0));
}

int bk_cdel(chunk *c, int db, const void *k, size_t kl)
{
    MDB_cursor *cur;
    MDB_val key = {kl, (void *)k}, val;
    int rc = chunk_cursor(c, db, &cur);
    if (rc)
        return rc;
    OP();
    rc = mdb_cursor_get(cur, &key, &val, MDB_SET);
    if (rc == MDB_NOTFOUND)
        return XM_OK;
    return xm_rc(rc ? rc : mdb_cursor_del(cur, 0));
}

int bk_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
                        const uint8_t **out)
{
    OP(); /* counted here; the lookup and its checks are the ROW path's */
    return xm_row_get_fixed(st, t, d, k, kl, want, out);
}



int bk_put_refs(chunk *c, uint64_t pbn, uint64_t len, uint64_t refs)
{
    uint8_t k[XM_PBN_KEY_LEN], v[XM_U64X2_LEN];
    xm_put_be64(k, pbn);
    xm_put_le64(v, len);
    xm_put_le64(v + 8, refs);
    return bk_cput(c, XM_DB_REFS, k, sizeof k, v, sizeof v);
}


/* Twin of allocator._bk_refs_overlapping: REFS runs overlapping [pbn, end), in order. */
int bk_refs_overlapping(chunk *c, uint64_t pbn, uint64_t end, refs_run *out, size_t cap,
                            size_t *n)
{
    MDB_cursor *cur;
    uint8_t kb[XM_PBN_KEY_LEN];
    MDB_val k = {sizeof kb, kb}, v;
    int rc = chunk_cursor(c, XM_DB_REFS, &cur); /* the chunk's: the puts that follow land near */
    if (rc)
        return rc;
    *n = 0;
    xm_put_be64(kb, pbn);
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); /* seek_le: the run at or before pbn */
    if (rc == MDB_NOTFOUND)
        rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
    else if (rc == 0 && !(k.mv_size == XM_PBN_KEY_LEN && xm_get_be64(k.mv_data) == pbn))
        if ((rc = mdb_cursor_get(cur, &k, &v, MDB_PREV)) == MDB_NOTFOUND) {
            xm_put_be64(kb, pbn);
            k = (MDB_val){sizeof kb, kb};
            rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        }
    STAT_ADD(c->st, cursor_steps, 1), OP();
    while (rc == 0) {
        if (k.mv_size != XM_PBN_KEY_LEN || v.mv_size != XM_U64X2_LEN) {
            rc = XM_ECORRUPT;
            break;
        }
        uint64_t s = xm_get_be64(k.mv_data);
        if (s >= end)
            break;
        refs_run r = {s, xm_get_le64(v.mv_data), xm_get_le64((const uint8_t *)v.mv_data + 8)};
        if (r.s + r.len > pbn) {
            if (*n >= cap) {
                rc = XM_ECORRUPT; /* more runs than blocks: overlapping REFS */
                break;
            }
            out[(*n)++] = r;
        }
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
        STAT_ADD(c->st, cursor_steps, 1), OP();
    }
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

/* Twin of allocator._bk_set_refs. */
int bk_set_refs(chunk *c, const refs_run *r, uint64_t start, uint64_t stop, uint64_t refs)
{
    uint8_t k[XM_PBN_KEY_LEN];
    int rc;
    xm_put_be64(k, r->s);
    if ((rc = bk_cdel(c, XM_DB_REFS, k, sizeof k)))
        return rc;
    if (r->s < start && (rc = bk_put_refs(c, r->s, start - r->s, r->refs)))
        return rc;
    if (refs >= 2 && (rc = bk_put_refs(c, start, stop - start, refs)))
        return rc;
    if (stop < r->s + r->len && (rc = bk_put_refs(c, stop, r->s + r->len - stop, r->refs)))
        return rc;
    return XM_OK;
}

/* Twin of extmap._count: COUNTERS (vol, death, birth) -= len, dropped at zero. */
static int count_down(chunk *c, const uint8_t key[XM_TRIPLE_KEY_LEN], uint64_t len)
{
    const uint8_t *p;
    uint8_t v[XM_U64_LEN];
    MDB_dbi d = c->st->dbi[XM_DB_COUNTERS];
    int rc = bk_get_fixed(c->st, c->t, d, key, XM_TRIPLE_KEY_LEN, XM_U64_LEN, &p);
    if (rc == XM_ENOTFOUND)
        return XM_ECORRUPT; /* a dead record nobody counted */
    if (rc)
        return rc;
    uint64_t n = xm_get_le64(p);
    if (n < len)
        return XM_ECORRUPT;
    if (n == len)
        return bk_del(c->t, d, key, XM_TRIPLE_KEY_LEN);
    xm_put_le64(v, n - len);
    return bk_put(c->t, d, key, XM_TRIPLE_KEY_LEN, v, XM_U64_LEN);
}

/* The dead record (vol, lba, birth) under the DEAD cursor dc, decoded, then deleted there. */
static int take_dead(chunk *c, MDB_cursor *dc, uint32_t vol, uint64_t lba, uint64_t birth,
                     xm_rec *r)
{
    uint8_t dk[XM_TRIPLE_KEY_LEN];
    MDB_val k = {sizeof dk, dk}, v;
    xm_key_triple(dk, vol, lba, birth);
    OP();
    int rc = mdb_cursor_get(dc, &k, &v, MDB_SET_KEY);
    if (rc == MDB_NOTFOUND)
        return XM_ECORRUPT; /* DEADIDX names a missing record */
    if (rc)
        return xm_rc(rc);
    if (!xm_in_map(c->st, v.mv_data, v.mv_size) || xm_rec_decode(v.mv_data, v.mv_size, r))
        return XM_ECORRUPT;
    OP();
    return xm_rc(mdb_cursor_del(dc, 0));
}

/* Twin of bulk.py's py_drop_window (extmap.window with a limit, extmap.drop_dead of each
 * entry, one COUNTERS update per (death, birth) group, the releases settled together).
 * One pass in DEADIDX order: the index entry is deleted where the walk's cursor stands, the
 * dead record where a second cursor finds it; counters are summed in memory while the walk
 * stays in one (death, birth) group (the window walks group by group). */
int xm_bulk_drop_window(xm_store *st, uint32_t vol, uint64_t dlo, uint64_t dhi, uint64_t blo,
                        uint64_t bhi, uint64_t limit, uint64_t punch_min, uint64_t *ndone)
{
    chunk c;
    MDB_cursor *ic = NULL, *dc = NULL;
    uint8_t kb[XM_DEADIDX_KEY_LEN], group[XM_TRIPLE_KEY_LEN];
    uint64_t n = 0, counted = 0;
    MDB_val k, v;
    *ndone = 0;
    if (limit == 0)
        return XM_OK;
    int rc = bk_begin(&c, st);
    if (rc)
        return rc;
    if ((rc = mdb_cursor_open(c.t, st->dbi[XM_DB_DEADIDX], &ic)) ||
        (rc = mdb_cursor_open(c.t, st->dbi[XM_DB_DEAD], &dc))) {
        if (ic)
            mdb_cursor_close(ic);
        return bk_end(&c, xm_rc(rc), punch_min);
    }
    xm_key_deadidx(kb, vol, dlo, blo, 0);
    k = (MDB_val){sizeof kb, kb};
    rc = mdb_cursor_get(ic, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && n < limit) {
        STAT_ADD(st, cursor_steps, 1), OP();
        if (k.mv_size != XM_DEADIDX_KEY_LEN) {
            rc = XM_ECORRUPT;
            break;
        }
        const uint8_t *p = k.mv_data;
        uint64_t death = xm_get_be64(p + 4), birth = xm_get_be64(p + 12);
        if (xm_get_be32(p) != vol || death > dhi)
            break;
        if (birth < blo || birth > bhi) {
            if (birth > bhi && death >= XM_INFINITY)
                break;
            xm_key_deadidx(kb, vol, birth < blo ? death : death + 1, blo, 0);
            k = (MDB_val){sizeof kb, kb};
            rc = mdb_cursor_get(ic, &k, &v, MDB_SET_RANGE);
            continue;
        }
        memcpy(kb, p, sizeof kb);
        if (counted && memcmp(group, kb, sizeof group) != 0) { /* a new (death, birth) */
            if ((rc = count_down(&c, group, counted)))
                break;
            counted = 0;
        }
        xm_rec r;
        if ((rc = take_dead(&c, dc, vol, xm_get_be64(kb + 20), birth, &r)) ||
            (rc = bk_release_later(&c, r.pbn, r.len)))
            break;
        memcpy(group, kb, sizeof group);
        counted += r.len;
        n++;
        OP();
        rc = bk_cursor_del_next(ic, kb, sizeof kb, &k, &v);
    }
    if (rc == MDB_NOTFOUND)
        rc = XM_OK;
    rc = xm_rc(rc);
    if (rc == XM_OK && counted)
        rc = count_down(&c, group, counted);
    mdb_cursor_close(ic);
    mdb_cursor_close(dc);
    rc = bk_end(&c, rc, punch_min);
    if (rc == XM_OK)
        *ndone = n;
    return rc;
}

/* Up to limit records of db (LIVE or DEAD) under the volume's prefix, each deleted where the
 * cursor stands, its index entry (LIVEBIRTH or DEADIDX) deleted by key and its blocks released
 * at the end of the chunk. */
static int drop_records(chunk *c, int db, uint32_t vol, uint64_t limit, uint64_t *n)
{
    MDB_cursor *cur;
    uint8_t kb[XM_TRIPLE_KEY_LEN], ik[XM_DEADIDX_KEY_LEN];
    MDB_val k = {XM_VOL_KEY_LEN, kb}, v;
    int live = db == XM_DB_LIVE;
    size_t klen = live ? XM_LIVE_KEY_LEN : XM_TRIPLE_KEY_LEN;
    int rc = mdb_cursor_open(c->t, c->st->dbi[db], &cur);
    if (rc)
        return xm_rc(rc);
    *n = 0;
    xm_put_be32(kb, vol);
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && *n < limit) {
        STAT_ADD(c->st, cursor_steps, 1), OP();
        if (k.mv_size < XM_VOL_KEY_LEN || xm_get_be32(k.mv_data) != vol)
            break;
        xm_rec r;
        if (k.mv_size != klen || !xm_in_map(c->st, v.mv_data, v.mv_size) ||
            xm_rec_decode(v.mv_data, v.mv_size, &r)) {
            rc = XM_ECORRUPT;
            break;
        }
        memcpy(kb, k.mv_data, klen);
        uint64_t lba = xm_get_be64(kb + 4);
        if (live)
            xm_key_triple(ik, vol, r.epoch, lba);
        else
            xm_key_deadidx(ik, vol, r.epoch, xm_get_be64(kb + 12), lba);
        if ((rc = bk_release_later(c, r.pbn, r.len)) ||
            (rc = bk_cdel(c, live ? XM_DB_LIVEBIRTH : XM_DB_DEADIDX, ik,
                          live ? XM_TRIPLE_KEY_LEN : XM_DEADIDX_KEY_LEN)))
            break;
        (*n)++;
        OP();
        rc = bk_cursor_del_next(cur, kb, klen, &k, &v);
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

/* Twin of bulk.py's py_drop_volume: live records (with their LIVEBIRTH entries), then dead
 * ones (with DEADIDX), the releases settled together. */
int xm_bulk_drop_volume(xm_store *st, uint32_t vol, uint64_t limit, uint64_t punch_min,
                        uint64_t *ndone)
{
    chunk c;
    uint64_t n = 0, m = 0;
    *ndone = 0;
    if (limit == 0)
        return XM_OK;
    int rc = bk_begin(&c, st);
    if (rc)
        return rc;
    rc = drop_records(&c, XM_DB_LIVE, vol, limit, &n);
    if (rc == XM_OK && n < limit)
        rc = drop_records(&c, XM_DB_DEAD, vol, limit - n, &m);
    rc = bk_end(&c, rc, punch_min);
    if (rc == XM_OK)
        *ndone = n + m;
    return rc;
}

int xm_bulk_del_range(xm_store *st, int db, const void *lo, size_t lolen, const void *hi,
                      size_t hilen, uint64_t limit, uint64_t *ndone)
{
    chunk c;
    MDB_cursor *cur;
    uint8_t kb[512];
    uint64_t n = 0;
    *ndone = 0;
    if (db < 0 || db >= XM_DB_COUNT || lolen > sizeof kb)
        return EINVAL;
    int rc = bk_begin(&c, st);
    if (rc)
        return rc;
    if ((rc = mdb_cursor_open(c.t, st->dbi[db], &cur)))
        return bk_end(&c, xm_rc(rc), 0);
    memcpy(kb, lo, lolen);
    MDB_val k = {lolen, kb}, v;
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && n < limit) {
        STAT_ADD(st, cursor_steps, 1), OP();
        size_t m = k.mv_size < hilen ? k.mv_size : hilen;
        int cmp = memcmp(k.mv_data, hi, m);
        if (cmp > 0 || (cmp == 0 && k.mv_size >= hilen) || k.mv_size > sizeof kb)
            break;
        memcpy(kb, k.mv_data, k.mv_size);
        OP();
        rc = bk_cursor_del_next(cur, kb, k.mv_size, &k, &v);
        n++;
    }
    mdb_cursor_close(cur);
    if (rc == MDB_NOTFOUND)
        rc = XM_OK;
    rc = bk_end(&c, xm_rc(rc), 0 - (uint64_t)1);
    if (rc == XM_OK)
        *ndone = n;
    return rc;
}
