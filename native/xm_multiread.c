/*
 * xm_multiread.c - xm_snap_readv: many block-aligned pieces of a snapshot's view read back to
 * back into one buffer in one call (issue 13: an incremental backup's ~26k scattered 4 KiB
 * changes of a 1 GiB volume).  Twin: backup.py's _read_pieces_py (extmap.view_at over the
 * pieces' span, then one pool read per record-piece overlap); tests compare the two.
 *
 * The view is extmap.view_at's (the same as xm_bulk_clone.c's, which runs inside a write
 * step): the live records born by epoch, plus the dead records with birth <= epoch < death,
 * over [lo, hi) of the whole span, sorted by lba (records visible at one epoch never overlap).
 * A snapshot view never needs the group-commit overlay (its entries are born now).  The caller
 * holds the I/O gate shared, as for any pool read.  Each read passes its logical block (the
 * XTS tweak of lba-mode encrypted volumes); in raw mode (xm_raw_io) the calling thread gets the
 * ciphertext as stored, which is what a raw backup of an encrypted volume uploads.
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int cmp_lba(const void *a, const void *b)
{
    const xm_extent *x = a, *y = b;
    return x->lba < y->lba ? -1 : x->lba > y->lba;
}

static int push(xm_extent **v, size_t *m, size_t *cap, xm_extent e)
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

/* Records of snapshot epoch's view overlapping [lo, hi), sorted; *out is malloc'ed. */
static int view(xm_store *st, MDB_txn *t, uint32_t vol, uint64_t epoch, uint64_t lo,
                uint64_t hi, xm_extent **out, size_t *n)
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
            (rc = push(&v, &m, &cap, (xm_extent){lba, r.pbn, birth, r.len, r.flags})))
            break;
        rc = mdb_cursor_get(cur, &k, &val, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    if (rc != 0 && rc != MDB_NOTFOUND) {
        free(v);
        return rc == ENOMEM || rc == XM_ECORRUPT ? rc : xm_rc(rc);
    }
    qsort(v, m, sizeof *v, cmp_lba);
    *out = v;
    *n = m;
    return XM_OK;
}

int xm_snap_readv(xm_store *st, uint32_t vol, uint64_t epoch, const uint64_t *offs,
                  const uint64_t *lens, size_t n, uint8_t *buf)
{
    if (n == 0)
        return XM_OK;
    for (size_t p = 0; p < n; p++)
        if (offs[p] % XM_BLOCK_SIZE || lens[p] % XM_BLOCK_SIZE ||
            (p && offs[p] < offs[p - 1] + lens[p - 1]))
            return EINVAL;
    uint64_t lo = offs[0] / XM_BLOCK_SIZE, hi = (offs[n - 1] + lens[n - 1]) / XM_BLOCK_SIZE;
    MDB_txn *t;
    xm_extent *recs = NULL;
    size_t nr = 0;
    int rc = xm_rtxn_get(st, &t);
    if (rc)
        return rc;
    rc = view(st, t, vol, epoch, lo, hi, &recs, &nr);
    xm_rtxn_put(st, t);
    if (rc)
        return rc;
    /* one sweep of both sorted lists; a record may cover several pieces */
    size_t i = 0;
    uint8_t *dst = buf;
    for (size_t p = 0; p < n && rc == XM_OK; p++) {
        uint64_t b0 = offs[p] / XM_BLOCK_SIZE, b1 = (offs[p] + lens[p]) / XM_BLOCK_SIZE;
        memset(dst, 0, lens[p]); /* holes (none in a backup's pieces: they are allocated) */
        while (i < nr && recs[i].lba + recs[i].len <= b0)
            i++;
        for (size_t j = i; j < nr && recs[j].lba < b1 && rc == XM_OK; j++) {
            uint64_t s = recs[j].lba > b0 ? recs[j].lba : b0;
            uint64_t x = recs[j].lba + recs[j].len < b1 ? recs[j].lba + recs[j].len : b1;
            if (s < x)
                rc = xm_pool_read(st, vol, recs[j].pbn + (s - recs[j].lba), s, 0,
                                  (x - s) * XM_BLOCK_SIZE, dst + (s - b0) * XM_BLOCK_SIZE);
        }
        dst += lens[p];
    }
    free(recs);
    return rc;
}
