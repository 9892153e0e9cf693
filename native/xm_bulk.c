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

int bk_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
                        const uint8_t **out)
{
    OP(); /* counted here; the lookup and its checks are the ROW path's */
    return xm_row_get_fixed(st, t, d, k, kl, want, out);
}



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

int bk_put_refs(chunk *c, uint64_t pbn, uint64_t len, uint64_t refs)
{
    uint8_t k[XM_PBN_KEY_LEN], v[XM_U64X2_LEN];
    xm_put_be64(k, pbn);
    xm_put_le64(v, len);
    xm_put_le64(v + 8, refs);
    return bk_put(c->t, c->st->dbi[XM_DB_REFS], k, sizeof k, v, sizeof v);
}


/* Twin of allocator._bk_refs_overlapping: REFS runs overlapping [pbn, end), in order. */
int bk_refs_overlapping(chunk *c, uint64_t pbn, uint64_t end, refs_run *out, size_t cap,
                            size_t *n)
{
    MDB_cursor *cur;
    uint8_t kb[XM_PBN_KEY_LEN];
    MDB_val k = {sizeof kb, kb}, v;
    int rc = mdb_cursor_open(c->t, c->st->dbi[XM_DB_REFS], &cur);
    if (rc)
        return xm_rc(rc);
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
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

/* Twin of allocator._bk_set_refs. */
int bk_set_refs(chunk *c, const refs_run *r, uint64_t start, uint64_t stop, uint64_t refs)
{
    uint8_t k[XM_PBN_KEY_LEN];
    int rc;
    xm_put_be64(k, r->s);
    if ((rc = bk_del(c->t, c->st->dbi[XM_DB_REFS], k, sizeof k)))
        return rc;
    if (r->s < start && (rc = bk_put_refs(c, r->s, start - r->s, r->refs)))
        return rc;
    if (refs >= 2 && (rc = bk_put_refs(c, start, stop - start, refs)))
        return rc;
    if (stop < r->s + r->len && (rc = bk_put_refs(c, stop, r->s + r->len - stop, r->refs)))
        return rc;
    return XM_OK;
}

/* A free piece: to PENDING under this transaction's seq (allocator.release). */
static int pend(chunk *c, uint64_t start, uint64_t stop)
{
    uint8_t k[16], v[XM_U64_LEN];
    int rc;
    if (c->seq == 0) {
        uint64_t seq;
        if ((rc = meta_get_u64(c, "seq", &seq)))
            return rc;
        c->seq = seq + 1;
        xm_put_le64(v, c->seq);
        if ((rc = bk_put(c->t, c->st->dbi[XM_DB_META], "seq", 3, v, XM_U64_LEN)))
            return rc;
    }
    xm_put_be64(k, c->seq);
    xm_put_be64(k + 8, start);
    xm_put_le64(v, stop - start);
    if ((rc = bk_put(c->t, c->st->dbi[XM_DB_PENDING], k, sizeof k, v, sizeof v)) ||
        (rc = add_pending(c, stop - start)))
        return rc;
    return freed_add(&c->freed, start, stop - start);
}

/* Twin of allocator.release: one record no longer holds [pbn, pbn+n) (n <= XM_MAX_EXTENT). */
int bk_release(chunk *c, uint64_t pbn, uint64_t n)
{
    refs_run runs[XM_MAX_EXTENT + 1];
    size_t nr;
    uint64_t end = pbn + n, pos = pbn;
    int rc = bk_refs_overlapping(c, pbn, end, runs, XM_MAX_EXTENT + 1, &nr);
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

typedef struct {
    uint64_t death, birth, lba;
} widx;

/* Twin of extmap.window with a limit: at most limit entries of the window, in DEADIDX order. */
static int window(chunk *c, uint32_t vol, uint64_t dlo, uint64_t dhi, uint64_t blo, uint64_t bhi,
                  widx *out, uint64_t limit, uint64_t *n)
{
    MDB_cursor *cur;
    uint8_t kb[XM_DEADIDX_KEY_LEN];
    MDB_val k, v;
    int rc = mdb_cursor_open(c->t, c->st->dbi[XM_DB_DEADIDX], &cur);
    if (rc)
        return xm_rc(rc);
    *n = 0;
    xm_key_deadidx(kb, vol, dlo, blo, 0);
    k = (MDB_val){sizeof kb, kb};
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && *n < limit) {
        STAT_ADD(c->st, cursor_steps, 1), OP();
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
            rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
            continue;
        }
        out[(*n)++] = (widx){death, birth, xm_get_be64(p + 20)};
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

/* Twin of extmap.drop_dead followed by allocator.release. */
static int drop_dead(chunk *c, uint32_t vol, const widx *w)
{
    uint8_t k[XM_DEADIDX_KEY_LEN];
    const uint8_t *raw;
    xm_rec r;
    int rc;
    xm_key_triple(k, vol, w->lba, w->birth);
    rc = bk_get_fixed(c->st, c->t, c->st->dbi[XM_DB_DEAD], k, XM_TRIPLE_KEY_LEN, XM_REC_LEN, &raw);
    if (rc)
        return rc == XM_ENOTFOUND ? XM_ECORRUPT : rc; /* DEADIDX names a missing record */
    if (xm_rec_decode(raw, XM_REC_LEN, &r))
        return XM_ECORRUPT;
    if ((rc = bk_del(c->t, c->st->dbi[XM_DB_DEAD], k, XM_TRIPLE_KEY_LEN)))
        return rc;
    xm_key_deadidx(k, vol, w->death, w->birth, w->lba);
    if ((rc = bk_del(c->t, c->st->dbi[XM_DB_DEADIDX], k, XM_DEADIDX_KEY_LEN)) ||
        (rc = count_down(c, k, r.len)))
        return rc;
    return bk_release(c, r.pbn, r.len);
}

int xm_bulk_drop_window(xm_store *st, uint32_t vol, uint64_t death_lo, uint64_t death_hi,
                        uint64_t birth_lo, uint64_t birth_hi, uint64_t limit, uint64_t punch_min,
                        uint64_t *ndone)
{
    chunk c;
    uint64_t n = 0;
    *ndone = 0;
    if (limit == 0)
        return XM_OK;
    widx *w = malloc(limit * sizeof *w);
    if (!w)
        return ENOMEM;
    int rc = bk_begin(&c, st);
    if (rc) {
        free(w);
        return rc;
    }
    rc = window(&c, vol, death_lo, death_hi, birth_lo, birth_hi, w, limit, &n);
    for (uint64_t i = 0; i < n && rc == XM_OK; i++)
        rc = drop_dead(&c, vol, &w[i]);
    free(w);
    rc = bk_end(&c, rc, punch_min);
    if (rc == XM_OK)
        *ndone = n;
    return rc;
}

/* Up to limit records of db under the 4-byte volume prefix, decoded (LIVE or DEAD). */
typedef struct {
    uint64_t a, b; /* LIVE: lba, -; DEAD: lba, birth */
    xm_rec r;
} vrec;

static int vol_records(chunk *c, int db, uint32_t vol, vrec *out, uint64_t limit, uint64_t *n)
{
    MDB_cursor *cur;
    uint8_t kb[XM_VOL_KEY_LEN];
    MDB_val k = {sizeof kb, kb}, v;
    size_t klen = db == XM_DB_LIVE ? XM_LIVE_KEY_LEN : XM_TRIPLE_KEY_LEN;
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
        vrec *o = &out[*n];
        if (k.mv_size != klen || !xm_in_map(c->st, v.mv_data, v.mv_size) ||
            xm_rec_decode(v.mv_data, v.mv_size, &o->r)) {
            rc = XM_ECORRUPT;
            break;
        }
        o->a = xm_get_be64((const uint8_t *)k.mv_data + 4);
        o->b = db == XM_DB_LIVE ? 0 : xm_get_be64((const uint8_t *)k.mv_data + 12);
        (*n)++;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

int xm_bulk_drop_volume(xm_store *st, uint32_t vol, uint64_t limit, uint64_t punch_min,
                        uint64_t *ndone)
{
    chunk c;
    uint64_t n = 0, m = 0;
    uint8_t k[XM_DEADIDX_KEY_LEN];
    *ndone = 0;
    if (limit == 0)
        return XM_OK;
    vrec *recs = malloc(limit * sizeof *recs);
    if (!recs)
        return ENOMEM;
    int rc = bk_begin(&c, st);
    if (rc) {
        free(recs);
        return rc;
    }
    /* Live records first (with their LIVEBIRTH entries), then dead ones (with DEADIDX): the
     * twin is bulk.py's py_drop_volume. */
    rc = vol_records(&c, XM_DB_LIVE, vol, recs, limit, &n);
    for (uint64_t i = 0; i < n && rc == XM_OK; i++) {
        xm_key_live(k, vol, recs[i].a);
        if ((rc = bk_release(&c, recs[i].r.pbn, recs[i].r.len)) ||
            (rc = bk_del(c.t, st->dbi[XM_DB_LIVE], k, XM_LIVE_KEY_LEN)))
            break;
        xm_key_triple(k, vol, recs[i].r.epoch, recs[i].a);
        rc = bk_del(c.t, st->dbi[XM_DB_LIVEBIRTH], k, XM_TRIPLE_KEY_LEN);
    }
    if (rc == XM_OK && n < limit)
        rc = vol_records(&c, XM_DB_DEAD, vol, recs, limit - n, &m);
    for (uint64_t i = 0; i < m && rc == XM_OK; i++) {
        xm_key_triple(k, vol, recs[i].a, recs[i].b);
        if ((rc = bk_release(&c, recs[i].r.pbn, recs[i].r.len)) ||
            (rc = bk_del(c.t, st->dbi[XM_DB_DEAD], k, XM_TRIPLE_KEY_LEN)))
            break;
        xm_key_deadidx(k, vol, recs[i].r.epoch, recs[i].b, recs[i].a);
        rc = bk_del(c.t, st->dbi[XM_DB_DEADIDX], k, XM_DEADIDX_KEY_LEN);
    }
    free(recs);
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
        /* Re-seek from the deleted key rather than trust the cursor's position after a
         * delete (LMDB's cursor-after-delete behaviour is subtle at page boundaries). */
        size_t kl = k.mv_size;
        memcpy(kb, k.mv_data, kl);
        OP();
        if ((rc = mdb_cursor_del(cur, 0)))
            break;
        n++;
        k = (MDB_val){kl, kb};
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    }
    mdb_cursor_close(cur);
    if (rc == MDB_NOTFOUND)
        rc = XM_OK;
    rc = bk_end(&c, xm_rc(rc), 0 - (uint64_t)1);
    if (rc == XM_OK)
        *ndone = n;
    return rc;
}
