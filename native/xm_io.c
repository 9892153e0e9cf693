/*
 * xm_io.c - the hot path over a volume's live view: read, in-place write, block status.  One
 * call per NBD request, with the GIL released; each is xm_io_begin (gate shared, range check,
 * a pooled read transaction, a cursor on LIVE), the work, and xm_io_end.  Pool I/O goes through
 * the pool seam (xm_pool.c).
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define PLAN_CAP (2 * BATCH + 2)

static int check_range(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, int write)
{
    if (vol >= st->nvols || !st->vols[vol].known)
        return XM_ENOVOL;
    if (write && !st->vols[vol].writable)
        return EROFS;
    if (offset + length < offset || offset + length > st->vols[vol].size_bytes)
        return XM_ERANGE;
    return XM_OK;
}

static int io_begin(xm_io *io, xm_store *st, uint32_t vol, uint64_t offset, uint64_t length,
                    int write, int write_txn, xm_ovhits *ov)
{
    int rc;
    *io = (xm_io){st, NULL, NULL, write_txn};
    xm_gate_enter(st);
    if ((rc = check_range(st, vol, offset, length, write)) || length == 0)
        return rc; /* nothing to read or write: no transaction */
    /* A write transaction allocates: refused on a full filesystem before it begins. */
    if (write_txn && (rc = xm_space_check(st, XM_SPACE_GROW)))
        return rc;
    /* The overlay before the transaction (see xm_ovhits). */
    if (ov && (rc = xm_ov_lookup(st, vol, offset / XM_BLOCK_SIZE,
                                 (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE, ov)))
        return rc;
    rc = write_txn ? xm_wtxn_begin(st, &io->txn) : xm_rtxn_get(st, &io->txn);
    if (rc) {
        io->txn = NULL;
        return rc;
    }
    return xm_rc(mdb_cursor_open(io->txn, st->dbi[XM_DB_LIVE], &io->live));
}

int xm_io_begin(xm_io *io, xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, int write,
                int write_txn)
{
    return io_begin(io, st, vol, offset, length, write, write_txn, NULL);
}

int xm_io_begin_ov(xm_io *io, xm_store *st, uint32_t vol, uint64_t offset, uint64_t length,
                   int write, xm_ovhits *ov)
{
    ov->n = 0;
    ov->hit = ov->local;
    return io_begin(io, st, vol, offset, length, write, 0, ov);
}

int xm_io_commit(xm_io *io)
{
    if (io->live)
        mdb_cursor_close(io->live);
    io->live = NULL;
    int rc = xm_rc(mdb_txn_commit(io->txn));
    io->txn = NULL;
    xm_wtxn_end(io->st, rc == XM_OK); /* (xm_space_after_commit is in there) */
    return rc;
}

int xm_io_end(xm_io *io, int rc)
{
    if (io->live)
        mdb_cursor_close(io->live);
    if (io->txn) {
        if (io->write_txn) {
            mdb_txn_abort(io->txn);
            xm_wtxn_end(io->st, 0);
        } else
            xm_rtxn_put(io->st, io->txn);
    }
    xm_gate_leave(io->st);
    return rc;
}

/* For each run of plan[], the bytes of [offset, offset+length) it covers: read into buf, or
 * (wbuf) written from wbuf.  A write never meets a hole: the caller checked coverage. */
static int apply_plan(xm_store *st, uint32_t vol, const xm_extent *plan, size_t np,
                      uint64_t offset, uint64_t length, uint8_t *buf, const uint8_t *wbuf)
{
    uint64_t end = offset + length;
    for (size_t i = 0; i < np; i++) {
        uint64_t rs = plan[i].lba * XM_BLOCK_SIZE, re = rs + (uint64_t)plan[i].len * XM_BLOCK_SIZE;
        uint64_t s = rs > offset ? rs : offset, e = re < end ? re : end;
        if (s >= e)
            continue;
        int rc;
        if (plan[i].pbn == XM_HOLE) {
            if (wbuf)
                return XM_ESLOW;
            memset(buf + (s - offset), 0, e - s);
            continue;
        }
        rc = wbuf ? xm_pool_write(st, vol, plan[i].pbn, plan[i].lba, s - rs, e - s, wbuf + (s - offset))
                  : xm_pool_read(st, vol, plan[i].pbn, plan[i].lba, s - rs, e - s, buf + (s - offset));
        if (rc)
            return rc;
    }
    return XM_OK;
}

static int ov_end(xm_ovhits *ov, int rc)
{
    xm_ov_free(ov);
    return rc;
}

/* Block status runs out[0..*k) (allocated: pbn 0, holes: XM_HOLE) with the overlay's blocks
 * marked allocated; runs past cap are dropped (the caller asks again from the last one). */
static int paint(xm_extent *out, size_t *k, size_t cap, const xm_ovhits *ov)
{
    size_t m = 0, j = 0, n = *k;
    xm_extent *tmp = malloc((n + 2 * ov->n) * sizeof *tmp);
    if (!tmp)
        return ENOMEM;
    for (size_t i = 0; i < n; i++) {
        uint64_t pos = out[i].lba, end = pos + out[i].len;
        while (pos < end) {
            while (j < ov->n && ov->hit[j].lba < pos)
                j++;
            uint64_t stop = end, pbn = out[i].pbn;
            if (pbn == XM_HOLE && j < ov->n && ov->hit[j].lba < end) {
                if (ov->hit[j].lba == pos) {
                    pbn = 0;
                    stop = pos + 1;
                } else {
                    stop = ov->hit[j].lba;
                }
            }
            if (m > 0 && tmp[m - 1].pbn == pbn && tmp[m - 1].lba + tmp[m - 1].len == pos)
                tmp[m - 1].len += (uint32_t)(stop - pos);
            else
                tmp[m++] = (xm_extent){pos, pbn, 0, (uint32_t)(stop - pos), 0};
            pos = stop;
        }
    }
    *k = m < cap ? m : cap;
    memcpy(out, tmp, *k * sizeof *tmp);
    free(tmp);
    return XM_OK;
}

int xm_conn_read(xm_store *st, xm_conn *c, uint32_t vol, uint64_t offset, uint64_t length,
                 uint8_t *buf)
{
    __atomic_add_fetch(&c->inflight, 1, __ATOMIC_SEQ_CST);
    int rc = __atomic_load_n(&c->revoked, __ATOMIC_SEQ_CST) ? XM_EREVOKED
                                                             : xm_read(st, vol, offset, length, buf);
    __atomic_sub_fetch(&c->inflight, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* xm_write_row_ex for xm_conn_write: ENOSPC is the general path's to answer (it reclaims). */
static int conn_row(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf,
                    int *moved)
{
    int rc = xm_write_row_ex(st, vol, offset, length, buf, moved);
    return rc == ENOSPC ? XM_ESLOW : rc;
}

int xm_conn_write(xm_store *st, xm_conn *c, uint32_t vol, uint64_t offset, uint64_t length,
                  const uint8_t *buf, int row)
{
    int rc;
    __atomic_add_fetch(&c->inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&c->revoked, __ATOMIC_SEQ_CST)) {
        rc = XM_EREVOKED;
    } else if (row && c->row_first) {
        int moved;
        rc = conn_row(st, vol, offset, length, buf, &moved);
        if (rc == XM_OK && !moved)
            STAT_ADD(st, fast_writes, 1); /* as xm_write_inplace counts it (bulk_pace.py) */
        /* In place, or declined (a huge request, a nearly full filesystem: the in-place
         * path may still take it, and does next time): back to in place first. */
        if ((rc == XM_OK && !moved) || rc == XM_ESLOW)
            c->row_first = 0;
    } else {
        rc = xm_write_inplace(st, vol, offset, length, buf);
        if (rc == XM_ESLOW && row) {
            int moved;
            rc = conn_row(st, vol, offset, length, buf, &moved);
            c->row_first = rc == XM_OK && moved;
        }
    }
    __atomic_sub_fetch(&c->inflight, 1, __ATOMIC_SEQ_CST);
    return rc;
}

void xm_conn_revoke(xm_conn *c)
{
    __atomic_store_n(&c->revoked, 1, __ATOMIC_SEQ_CST);
}

uint32_t xm_conn_inflight(xm_conn *c)
{
    return __atomic_load_n(&c->inflight, __ATOMIC_SEQ_CST);
}

int xm_read(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, uint8_t *buf)
{
    xm_extent recs[BATCH], plan[PLAN_CAP];
    xm_io io;
    xm_ovhits ov = {0};
    int rc;
    if ((rc = xm_io_begin_ov(&io, st, vol, offset, length, 0, &ov)) || length == 0)
        return ov_end(&ov, xm_io_end(&io, rc));
    uint64_t pos = offset / XM_BLOCK_SIZE;
    uint64_t end = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    while (pos < end) {
        size_t n, np;
        int more;
        if ((rc = xm_scan_live(st, io.live, vol, pos, end, recs, BATCH, &n, &more)))
            return ov_end(&ov, xm_io_end(&io, rc));
        uint64_t upto = more ? recs[n - 1].lba + recs[n - 1].len : end;
        if (upto > end)
            upto = end;
        if ((rc = xm_plan(recs, n, pos, upto - pos, plan, PLAN_CAP, &np)) ||
            (rc = apply_plan(st, vol, plan, np, offset, length, buf, NULL)))
            return ov_end(&ov, xm_io_end(&io, rc));
        pos = upto;
    }
    /* Blocks in the overlay: their new content, over what the map still says. */
    for (size_t i = 0; i < ov.n && rc == XM_OK; i++) {
        uint64_t bs = ov.hit[i].lba * XM_BLOCK_SIZE, s = bs > offset ? bs : offset;
        uint64_t e = bs + XM_BLOCK_SIZE < offset + length ? bs + XM_BLOCK_SIZE : offset + length;
        rc = xm_pool_read(st, vol, ov.hit[i].pbn, ov.hit[i].lba, s - bs, e - s, buf + (s - offset));
    }
    if (rc == XM_OK)
        STAT_ADD(st, fast_reads, 1);
    return ov_end(&ov, xm_io_end(&io, rc));
}

int xm_write_inplace(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf)
{
    xm_extent recs[BATCH], plan[PLAN_CAP];
    xm_io io;
    xm_ovhits ov = {0};
    int rc, more;
    size_t n, np;
    if ((rc = xm_io_begin_ov(&io, st, vol, offset, length, 1, &ov)) || length == 0)
        return ov_end(&ov, xm_io_end(&io, rc));
    uint64_t lo = offset / XM_BLOCK_SIZE;
    uint64_t hi = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    if (ov.n > 0) {
        /* Blocks in the overlay born after the newest snapshot are the volume's own: in place
         * at their new pbn (one that survived a snapshot is redirected: xm_write_row).
         * Only a request wholly in the overlay is done here; a mixed one goes to xm_write_row. */
        rc = ov.n == hi - lo ? XM_OK : XM_ESLOW;
        for (size_t i = 0; i < ov.n && rc == XM_OK; i++) /* survived a snapshot (xm_batch.c) */
            rc = ov.hit[i].birth <= st->vols[vol].max_snap ? XM_ESLOW : XM_OK;
        for (size_t i = 0; i < ov.n && rc == XM_OK; i++) {
            uint64_t bs = ov.hit[i].lba * XM_BLOCK_SIZE, s = bs > offset ? bs : offset;
            uint64_t e = bs + XM_BLOCK_SIZE < offset + length ? bs + XM_BLOCK_SIZE : offset + length;
            rc = xm_pool_write(st, vol, ov.hit[i].pbn, ov.hit[i].lba, s - bs, e - s, buf + (s - offset));
        }
        STAT_ADD(st, fast_writes, rc == XM_OK);
        STAT_ADD(st, slow_writes, rc == XM_ESLOW);
        return ov_end(&ov, xm_io_end(&io, rc));
    }
    if ((rc = xm_scan_live(st, io.live, vol, lo, hi, recs, BATCH, &n, &more)))
        return xm_io_end(&io, rc);
    /* In place only if the records cover the range without gaps, and none is held by a
     * snapshot (born at or before the newest one) or possibly shared with another record. */
    uint64_t pos = lo, max_snap = st->vols[vol].max_snap;
    rc = more ? XM_ESLOW : XM_OK;
    for (size_t i = 0; i < n && rc == XM_OK; i++) {
        if (recs[i].lba > pos || recs[i].birth <= max_snap || (recs[i].flags & XM_F_SHARED))
            rc = XM_ESLOW;
        pos = recs[i].lba + recs[i].len;
    }
    if (rc == XM_OK && pos < hi)
        rc = XM_ESLOW;
    if (rc == XM_OK && (rc = xm_plan(recs, n, lo, hi - lo, plan, PLAN_CAP, &np)) == XM_OK)
        rc = apply_plan(st, vol, plan, np, offset, length, NULL, buf);
    if (rc == XM_OK)
        STAT_ADD(st, fast_writes, 1);
    else if (rc == XM_ESLOW)
        STAT_ADD(st, slow_writes, 1);
    return ov_end(&ov, xm_io_end(&io, rc));
}

int xm_block_status(xm_store *st, uint32_t vol, uint64_t lba, uint64_t nblocks,
                    xm_extent *out, size_t cap, size_t *nout)
{
    xm_extent recs[BATCH], runs[PLAN_CAP];
    xm_io io;
    xm_ovhits ov = {0};
    size_t k = 0;
    int rc;
    *nout = 0;
    if (lba > UINT64_MAX / XM_BLOCK_SIZE || nblocks > UINT64_MAX / XM_BLOCK_SIZE)
        return XM_ERANGE;
    if ((rc = xm_io_begin_ov(&io, st, vol, lba * XM_BLOCK_SIZE, nblocks * XM_BLOCK_SIZE, 0, &ov)))
        return ov_end(&ov, xm_io_end(&io, rc));
    uint64_t pos = lba, end = lba + nblocks;
    while (pos < end && k < cap) {
        size_t n, nr;
        int more;
        if ((rc = xm_scan_live(st, io.live, vol, pos, end, recs, BATCH, &n, &more)))
            break;
        uint64_t upto = more ? recs[n - 1].lba + recs[n - 1].len : end;
        if (upto > end)
            upto = end;
        if ((rc = xm_extents(recs, n, pos, upto - pos, runs, PLAN_CAP, &nr)))
            break;
        for (size_t i = 0; i < nr; i++) {
            if (k > 0 && out[k - 1].pbn == runs[i].pbn &&
                (uint64_t)out[k - 1].len + runs[i].len <= 0xFFFFFFFFu) {
                out[k - 1].len += runs[i].len;
            } else if (k < cap) {
                out[k++] = runs[i];
            } else {
                break; /* the caller asks again from where we stopped */
            }
        }
        pos = upto;
    }
    if (rc == XM_OK && ov.n > 0)
        rc = paint(out, &k, cap, &ov);
    *nout = k;
    return ov_end(&ov, xm_io_end(&io, rc));
}
