/*
 * xm_bulk_clone.c - one bounded step of a clone: the snapshot's view over a window of blocks
 * copied into the new volume (SHARED, holders raised), the source's still-live records in it
 * marked SHARED.  Twin: bulk.py's py_clone_step (extmap.view_at, snapshots' mark-live-shared,
 * extmap.clip + copy_in), with the same database operations in the same order.
 */
#include "xm_bulk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int cmp_ext(const void *a, const void *b)
{
    const xm_extent *x = a, *y = b;
    return x->lba < y->lba ? -1 : x->lba > y->lba;
}

static int load_vs(chunk *c, uint32_t vol, xm_volstate *vs)
{
    uint8_t k[XM_VOL_KEY_LEN];
    const uint8_t *raw;
    xm_put_be32(k, vol);
    int rc = bk_get_fixed(c->st, c->t, c->st->dbi[XM_DB_VOLSTATE], k, sizeof k, XM_VOLSTATE_LEN, &raw);
    if (rc)
        return rc == XM_ENOTFOUND ? XM_ENOVOL : rc;
    xm_volstate_decode(raw, XM_VOLSTATE_LEN, vs);
    return XM_OK;
}

static int save_vs(chunk *c, uint32_t vol, const xm_volstate *vs)
{
    uint8_t k[XM_VOL_KEY_LEN], v[XM_VOLSTATE_LEN];
    xm_put_be32(k, vol);
    xm_volstate_encode(v, vs);
    return bk_put(c->t, c->st->dbi[XM_DB_VOLSTATE], k, sizeof k, v, sizeof v);
}

/* extmap.view_at: records of snapshot epoch's view overlapping [lo, hi), sorted, not clipped. */
static int view_at(chunk *c, uint32_t vol, uint64_t epoch, uint64_t lo, uint64_t hi,
                   xm_extent **out, size_t *n)
{
    size_t cap = 256, nl;
    int more, rc;
    xm_extent *v = NULL;
    MDB_cursor *cur;
    if ((rc = mdb_cursor_open(c->t, c->st->dbi[XM_DB_LIVE], &cur)))
        return xm_rc(rc);
    for (;;) {
        free(v);
        if (!(v = malloc(cap * sizeof *v))) {
            mdb_cursor_close(cur);
            return ENOMEM;
        }
        OP();
        if ((rc = xm_scan_live(c->st, cur, vol, lo, hi, v, cap, &nl, &more)) || !more)
            break;
        cap *= 4;
    }
    mdb_cursor_close(cur);
    size_t m = 0;
    for (size_t i = 0; i < nl; i++)
        if (v[i].birth <= epoch && v[i].lba < hi && v[i].lba + v[i].len > lo)
            v[m++] = v[i];
    if (rc == XM_OK && (rc = mdb_cursor_open(c->t, c->st->dbi[XM_DB_DEAD], &cur)))
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
        OP();
        if (k.mv_size != XM_TRIPLE_KEY_LEN || memcmp(k.mv_data, stop, sizeof stop) >= 0)
            break;
        xm_rec r;
        if (!xm_in_map(c->st, val.mv_data, val.mv_size) || xm_rec_decode(val.mv_data, val.mv_size, &r)) {
            rc = XM_ECORRUPT;
            break;
        }
        uint64_t lba = xm_get_be64((const uint8_t *)k.mv_data + 4);
        uint64_t birth = xm_get_be64((const uint8_t *)k.mv_data + 12);
        if (birth <= epoch && epoch < r.epoch && lba + r.len > lo) {
            if (m == cap) {
                xm_extent *p = realloc(v, 2 * cap * sizeof *v);
                if (!p) {
                    rc = ENOMEM;
                    break;
                }
                v = p;
                cap *= 2;
            }
            v[m++] = (xm_extent){lba, r.pbn, birth, r.len, r.flags};
        }
        rc = mdb_cursor_get(cur, &k, &val, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    if (rc != 0 && rc != MDB_NOTFOUND) {
        free(v);
        return xm_rc(rc);
    }
    qsort(v, m, sizeof *v, cmp_ext);
    *out = v;
    *n = m;
    return XM_OK;
}

int xm_bulk_clone_step(xm_store *st, uint32_t src, uint64_t epoch, uint32_t dst, uint64_t lo,
                       uint64_t hi, const void *pos_key, size_t pklen, uint64_t *nrecs)
{
    chunk c;
    xm_volstate svs, dvs;
    xm_extent *recs = NULL;
    size_t n = 0;
    int rc = bk_begin(&c, st);
    if (rc)
        return rc;
    if ((rc = load_vs(&c, src, &svs)) || (rc = load_vs(&c, dst, &dvs)) ||
        (rc = view_at(&c, src, epoch, lo, hi, &recs, &n)))
        return bk_end(&c, rc, UINT64_MAX);
    /* the source's records still live get SHARED (snapshots.py: _mark_live_shared) */
    for (size_t i = 0; i < n && rc == XM_OK; i++) {
        uint8_t k[XM_LIVE_KEY_LEN];
        const uint8_t *raw;
        xm_rec r;
        if (recs[i].flags & XM_F_SHARED)
            continue;
        xm_key_live(k, src, recs[i].lba);
        rc = bk_get_fixed(st, c.t, st->dbi[XM_DB_LIVE], k, sizeof k, XM_REC_LEN, &raw);
        if (rc == XM_ENOTFOUND) {
            rc = XM_OK;
            continue;
        }
        if (rc)
            break;
        if (xm_rec_decode(raw, XM_REC_LEN, &r)) {
            rc = XM_ECORRUPT;
            break;
        }
        if (r.len == recs[i].len && r.flags == recs[i].flags && r.pbn == recs[i].pbn &&
            r.epoch == recs[i].birth) {
            xm_extent e = recs[i];
            e.flags |= XM_F_SHARED;
            rc = bk_live_put(&c, src, &svs, &e);
        }
    }
    /* extmap.clip to [lo, hi), then copy_in born 1 */
    size_t copied = 0;
    for (size_t i = 0; i < n && rc == XM_OK; i++) {
        uint64_t s = recs[i].lba > lo ? recs[i].lba : lo;
        uint64_t x = recs[i].lba + recs[i].len < hi ? recs[i].lba + recs[i].len : hi;
        if (s >= x)
            continue;
        uint64_t pbn = recs[i].pbn + (s - recs[i].lba), len = x - s;
        for (uint64_t p = 0; p < len && rc == XM_OK; p += XM_MAX_EXTENT) {
            uint64_t m = len - p < XM_MAX_EXTENT ? len - p : XM_MAX_EXTENT;
            xm_extent cp = {s + p, pbn + p, 1, (uint32_t)m, XM_F_SHARED};
            if ((rc = bk_live_put(&c, dst, &dvs, &cp)) == XM_OK)
                rc = bk_share(&c, pbn + p, m);
        }
        dvs.live_blocks += len;
        copied++;
    }
    free(recs);
    if (copied)
        dvs.flags |= XM_VS_SHARED;
    svs.flags |= XM_VS_SHARED;
    if (rc == XM_OK && (rc = save_vs(&c, src, &svs)) == XM_OK &&
        (rc = save_vs(&c, dst, &dvs)) == XM_OK) {
        uint8_t pv[XM_U64_LEN];
        xm_put_le64(pv, hi);
        rc = bk_put(c.t, st->dbi[XM_DB_META], pos_key, pklen, pv, sizeof pv);
    }
    if ((rc = bk_end(&c, rc, UINT64_MAX)) == XM_OK)
        *nrecs = n;
    return rc;
}
