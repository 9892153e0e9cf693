/*
 * xm_multiread.c - xm_snap_readv: many block-aligned pieces of a snapshot's view read back to
 * back into one buffer in one call (issue 13: an incremental backup's ~26k scattered 4 KiB
 * changes of a 1 GiB volume).  Twin: backup.py's _read_pieces_py (extmap.view_at over the
 * pieces' span, then one pool read per record-piece overlap); tests compare the two.
 *
 * The view is extmap.view_at's (xm_snap_view in xm_kv.c, shared with xm_bulk_clone.c): the
 * live records born by epoch, plus the dead records with birth <= epoch < death,
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
    rc = xm_snap_view(st, t, vol, epoch, lo, hi, &recs, &nr, NULL);
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
