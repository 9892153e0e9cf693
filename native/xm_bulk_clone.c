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
        (rc = xm_snap_view(c.st, c.t, src, epoch, lo, hi, &recs, &n, &xm_bulk_nops)))
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
