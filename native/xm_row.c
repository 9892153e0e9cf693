/*
 * xm_row.c - the redirect-on-write write path, xm_write_row.
 *
 * The C twin of the common case of the Python engine's general write (Engine._write_locked)
 * together with extmap.overlay/kill and allocator.allocate: the records it touches are never
 * SHARED, so no block changes its holder count, and every record it covers is held by a
 * snapshot (or it would have been written in place), so covered parts always become dead
 * records: nothing is freed.  It writes the same bytes to the same databases as its twin (a
 * differential test compares every database after the same writes).
 *
 * Order: everything that can refuse or fail the redirect comes first (ESLOW, ENOSPC from the
 * allocator or the filesystem, a full map, the commit); the in-place parts of the request are
 * written last, after the commit.  So a request answered ESLOW or ENOSPC has written nothing the
 * general path would not rewrite, and data reaches newly allocated blocks before the map that
 * points at them commits.  Encodings: xm_layout.h.
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RUNS 16 /* allocation runs per redirected run: more is too fragmented for C */

_Static_assert(sizeof(xm_extent) == 32, "xm_extent has no padding (compared with memcmp)");

static int kv_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl)
{
    MDB_val key = {kl, (void *)k}, val = {vl, (void *)v};
    return xm_rc(mdb_put(t, d, &key, &val, 0));
}

static int kv_del(MDB_txn *t, MDB_dbi d, const void *k, size_t kl)
{
    MDB_val key = {kl, (void *)k};
    int rc = mdb_del(t, d, &key, NULL);
    return rc == MDB_NOTFOUND ? XM_OK : xm_rc(rc);
}

/* The value under k if it is exactly want bytes long: XM_ENOTFOUND if absent, XM_ECORRUPT if
 * it has another size or lies outside the map. */
static int kv_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
                        const uint8_t **out)
{
    MDB_val key = {kl, (void *)k}, v;
    int rc = mdb_get(t, d, &key, &v);
    if (rc)
        return xm_rc(rc);
    if (v.mv_size != want || !xm_in_map(st, v.mv_data, v.mv_size))
        return XM_ECORRUPT;
    *out = v.mv_data;
    return XM_OK;
}

static int live_put(xm_store *st, MDB_txn *t, uint32_t vol, xm_volstate *vs, const xm_extent *e)
{
    uint8_t k[XM_TRIPLE_KEY_LEN], v[XM_REC_LEN];
    xm_rec_encode(v, &(xm_rec){e->len, e->flags, e->pbn, e->birth});
    xm_key_live(k, vol, e->lba);
    int rc = kv_put(t, st->dbi[XM_DB_LIVE], k, XM_LIVE_KEY_LEN, v, XM_REC_LEN);
    if (rc || vs->nsnaps == 0)
        return rc;
    xm_key_triple(k, vol, e->birth, e->lba);
    xm_put_le32(v, e->len);
    vs->flags |= XM_VS_BIRTH_INDEXED;
    return kv_put(t, st->dbi[XM_DB_LIVEBIRTH], k, XM_TRIPLE_KEY_LEN, v, XM_U32_LEN);
}

static int live_del(xm_store *st, MDB_txn *t, uint32_t vol, const xm_volstate *vs, const xm_extent *e)
{
    uint8_t k[XM_TRIPLE_KEY_LEN];
    xm_key_live(k, vol, e->lba);
    int rc = kv_del(t, st->dbi[XM_DB_LIVE], k, XM_LIVE_KEY_LEN);
    if (rc || !(vs->flags & XM_VS_BIRTH_INDEXED))
        return rc;
    xm_key_triple(k, vol, e->birth, e->lba);
    return kv_del(t, st->dbi[XM_DB_LIVEBIRTH], k, XM_TRIPLE_KEY_LEN);
}

/* The covered part of a record a snapshot holds: a dead record, its DEADIDX entry, COUNTERS. */
static int add_dead(xm_store *st, MDB_txn *t, uint32_t vol, const xm_extent *e, uint64_t death)
{
    uint8_t k[XM_DEADIDX_KEY_LEN], v[XM_REC_LEN];
    const uint8_t *old;
    int rc;
    xm_key_triple(k, vol, e->lba, e->birth);
    xm_rec_encode(v, &(xm_rec){e->len, e->flags, e->pbn, death});
    if ((rc = kv_put(t, st->dbi[XM_DB_DEAD], k, XM_TRIPLE_KEY_LEN, v, XM_REC_LEN)))
        return rc;
    xm_key_deadidx(k, vol, death, e->birth, e->lba);
    xm_put_le32(v, e->len);
    if ((rc = kv_put(t, st->dbi[XM_DB_DEADIDX], k, XM_DEADIDX_KEY_LEN, v, XM_U32_LEN)))
        return rc;
    uint64_t n = 0; /* COUNTERS key: vol, death, birth: the first 20 bytes of the DEADIDX key */
    rc = kv_get_fixed(st, t, st->dbi[XM_DB_COUNTERS], k, XM_TRIPLE_KEY_LEN, XM_U64_LEN, &old);
    if (rc == XM_OK)
        n = xm_get_le64(old);
    else if (rc != XM_ENOTFOUND)
        return rc;
    xm_put_le64(v, n + e->len);
    return kv_put(t, st->dbi[XM_DB_COUNTERS], k, XM_TRIPLE_KEY_LEN, v, XM_U64_LEN);
}

/* META value of two u64s (alloc, blocks); absent reads as zeros, like the Python twin. */
static int meta_get2(xm_store *st, MDB_txn *t, const char *name, uint64_t out[2])
{
    const uint8_t *p;
    int rc = kv_get_fixed(st, t, st->dbi[XM_DB_META], name, strlen(name), XM_U64X2_LEN, &p);
    out[0] = out[1] = 0;
    if (rc == XM_ENOTFOUND)
        return XM_OK;
    if (rc == XM_OK) {
        out[0] = xm_get_le64(p);
        out[1] = xm_get_le64(p + 8);
    }
    return rc;
}

static int meta_put2(xm_store *st, MDB_txn *t, const char *name, const uint64_t v[2])
{
    uint8_t b[XM_U64X2_LEN];
    xm_put_le64(b, v[0]);
    xm_put_le64(b + 8, v[1]);
    return kv_put(t, st->dbi[XM_DB_META], name, strlen(name), b, sizeof b);
}

/* One FREE run under the cursor, validated. */
static int free_run(const xm_store *st, const MDB_val *k, const MDB_val *v, uint64_t *pbn, uint64_t *len)
{
    if (k->mv_size != XM_PBN_KEY_LEN || v->mv_size != XM_U64_LEN || !xm_in_map(st, k->mv_data, 8) ||
        !xm_in_map(st, v->mv_data, 8))
        return XM_ECORRUPT;
    *pbn = xm_get_be64(k->mv_data);
    *len = xm_get_le64(v->mv_data);
    return *len == 0 || *pbn > UINT64_MAX / XM_BLOCK_SIZE - *len ? XM_ECORRUPT : XM_OK;
}

/* Twin of allocator.allocate: free runs from the next-fit hint on, then from the start, then
 * fresh space at the high-water mark.  Runs go to out[] (cap entries). */
static int allocate(xm_store *st, MDB_txn *t, uint64_t need, xm_extent *out, size_t cap, size_t *nout)
{
    uint64_t alloc[2], totals[2], taken = 0;
    int rc = meta_get2(st, t, XM_META_ALLOC, alloc);
    if (rc)
        return rc;
    uint64_t hwm = alloc[0], hint = alloc[1];
    size_t n = 0;
    MDB_cursor *c;
    if ((rc = mdb_cursor_open(t, st->dbi[XM_DB_FREE], &c)))
        return xm_rc(rc);
    for (int pass = 0; pass < 2 && need > 0 && rc == XM_OK; pass++) {
        uint8_t kb[XM_PBN_KEY_LEN];
        xm_put_be64(kb, pass == 0 ? hint : 0);
        MDB_val k = {sizeof kb, kb}, fv;
        rc = mdb_cursor_get(c, &k, &fv, MDB_SET_RANGE);
        while (rc == XM_OK && need > 0) {
            uint64_t pbn, len;
            if ((rc = free_run(st, &k, &fv, &pbn, &len)))
                break;
            if (pass == 1 && pbn >= hint)
                break;
            uint64_t take = len < need ? len : need;
            if (n >= cap) {
                rc = XM_ESLOW; /* too fragmented for the fast path */
                break;
            }
            if ((rc = mdb_cursor_del(c, 0)))
                break;
            if (take < len) {
                uint8_t nk[XM_PBN_KEY_LEN], nv[XM_U64_LEN];
                xm_put_be64(nk, pbn + take);
                xm_put_le64(nv, len - take);
                if ((rc = kv_put(t, st->dbi[XM_DB_FREE], nk, sizeof nk, nv, sizeof nv)))
                    break;
            }
            out[n++] = (xm_extent){0, pbn, 0, (uint32_t)take, 0};
            need -= take;
            taken += take;
            hint = pbn + take;
            xm_put_be64(kb, pbn + take);
            k = (MDB_val){sizeof kb, kb};
            rc = mdb_cursor_get(c, &k, &fv, MDB_SET_RANGE);
        }
        if (rc == MDB_NOTFOUND)
            rc = XM_OK;
    }
    mdb_cursor_close(c);
    if (rc)
        return xm_rc(rc);
    if (need) {
        const uint8_t *p;
        if ((rc = kv_get_fixed(st, t, st->dbi[XM_DB_META], XM_META_POOL_BLOCKS,
                               strlen(XM_META_POOL_BLOCKS), XM_U64_LEN, &p)))
            return rc == XM_ENOTFOUND ? XM_ECORRUPT : rc;
        uint64_t pool_blocks = xm_get_le64(p);
        if (hwm > pool_blocks || need > pool_blocks - hwm)
            return ENOSPC;
        if (n >= cap)
            return XM_ESLOW;
        out[n++] = (xm_extent){0, hwm, 0, (uint32_t)need, 0};
        hwm += need;
        hint = hwm;
    }
    alloc[0] = hwm;
    alloc[1] = hint;
    if ((rc = meta_put2(st, t, XM_META_ALLOC, alloc)))
        return rc;
    if (taken) {
        if ((rc = meta_get2(st, t, XM_META_BLOCKS, totals)))
            return rc;
        if (totals[0] < taken)
            return XM_ECORRUPT; /* FREE holds more than the totals say */
        totals[0] -= taken;
        if ((rc = meta_put2(st, t, XM_META_BLOCKS, totals)))
            return rc;
    }
    /* merge physically contiguous runs */
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (m > 0 && out[m - 1].pbn + out[m - 1].len == out[i].pbn)
            out[m - 1].len += out[i].len;
        else
            out[m++] = out[i];
    }
    *nout = m;
    return XM_OK;
}

/* Twin of extmap.overlay followed by kill: nw becomes current over its range; the covered
 * parts of the old records become dead records (death = the volume's epoch). */
static int overlay(xm_store *st, MDB_txn *t, MDB_cursor *c, uint32_t vol, xm_volstate *vs,
                   const xm_extent *nw)
{
    xm_extent old[BATCH], keep[BATCH + 2], gone[BATCH];
    size_t n, nk, ng;
    int more, rc;
    uint64_t lo = nw->lba > 0 ? nw->lba - 1 : 0;
    if ((rc = xm_scan_live(st, c, vol, lo, nw->lba + nw->len + 1, old, BATCH, &n, &more)))
        return rc;
    if (more)
        return XM_ESLOW;
    if ((rc = xm_insert(old, n, nw, XM_MAX_EXTENT, keep, &nk, gone, &ng)))
        return rc;
    for (size_t i = 0; i < n; i++) {
        int kept = 0;
        for (size_t j = 0; j < nk && !kept; j++)
            kept = memcmp(&old[i], &keep[j], sizeof old[i]) == 0;
        if (!kept && (rc = live_del(st, t, vol, vs, &old[i])))
            return rc;
    }
    for (size_t j = 0; j < nk; j++) {
        int existed = 0;
        for (size_t i = 0; i < n && !existed; i++)
            existed = memcmp(&old[i], &keep[j], sizeof old[i]) == 0;
        if (!existed && (rc = live_put(st, t, vol, vs, &keep[j])))
            return rc;
    }
    for (size_t i = 0; i < ng; i++) {
        if (gone[i].birth > vs->max_snap || (gone[i].flags & XM_F_SHARED))
            return XM_ECORRUPT; /* cannot happen: such parts are written in place */
        if ((rc = add_dead(st, t, vol, &gone[i], vs->epoch)))
            return rc;
        vs->live_blocks -= gone[i].len;
    }
    vs->live_blocks += nw->len;
    return XM_OK;
}

/* Full-block content of blocks [a, b) for a write of [offset, offset+length): the new data,
 * and the old content of partly written first and last blocks (read-modify-write). */
static int fill_blocks(xm_store *st, uint32_t vol, const xm_extent *recs, size_t n, uint64_t a,
                       uint64_t b, uint64_t offset, uint64_t length, const uint8_t *buf,
                       uint8_t *out)
{
    uint64_t end = offset + length;
    uint64_t edges[2] = {a, b - 1};
    memset(out, 0, (b - a) * XM_BLOCK_SIZE);
    for (int i = 0; i < 2; i++) {
        uint64_t blk = edges[i], bs = blk * XM_BLOCK_SIZE, be = bs + XM_BLOCK_SIZE;
        if (i == 1 && edges[1] == edges[0])
            break;
        if (bs >= offset && be <= end)
            continue;
        for (size_t j = 0; j < n; j++) {
            if (recs[j].lba <= blk && blk < recs[j].lba + recs[j].len) {
                int rc = xm_pool_read(st, vol, recs[j].pbn + blk - recs[j].lba, 0,
                                      XM_BLOCK_SIZE, out + (blk - a) * XM_BLOCK_SIZE);
                if (rc)
                    return rc;
                break;
            }
        }
    }
    uint64_t s = a * XM_BLOCK_SIZE > offset ? a * XM_BLOCK_SIZE : offset;
    uint64_t x = b * XM_BLOCK_SIZE < end ? b * XM_BLOCK_SIZE : end;
    memcpy(out + (s - a * XM_BLOCK_SIZE), buf + (s - offset), x - s);
    return XM_OK;
}

/* Blocks [a, b) to new blocks: allocate, write the data there, overlay the map. */
static int redirect_run(xm_store *st, MDB_txn *t, MDB_cursor *c, uint32_t vol, xm_volstate *vs,
                        const xm_extent *recs, size_t n, uint64_t a, uint64_t b,
                        uint64_t offset, uint64_t length, const uint8_t *buf)
{
    xm_extent runs[MAX_RUNS];
    size_t nruns;
    int rc;
    uint8_t *data = malloc((b - a) * XM_BLOCK_SIZE);
    if (!data)
        return ENOMEM;
    if ((rc = fill_blocks(st, vol, recs, n, a, b, offset, length, buf, data)) ||
        (rc = allocate(st, t, b - a, runs, MAX_RUNS, &nruns)))
        goto out;
    uint64_t pos = 0;
    for (size_t r = 0; r < nruns && rc == XM_OK; r++) {
        if ((rc = xm_pool_write(st, vol, runs[r].pbn, 0, (uint64_t)runs[r].len * XM_BLOCK_SIZE,
                                data + pos * XM_BLOCK_SIZE)))
            break;
        for (uint64_t k = 0; k < runs[r].len && rc == XM_OK; k += XM_MAX_EXTENT) {
            uint64_t m = runs[r].len - k < XM_MAX_EXTENT ? runs[r].len - k : XM_MAX_EXTENT;
            xm_extent nw = {a + pos + k, runs[r].pbn + k, vs->epoch, (uint32_t)m, 0};
            rc = overlay(st, t, c, vol, vs, &nw);
        }
        pos += runs[r].len;
    }
out:
    free(data);
    return rc;
}

/* [lo, hi) cut by record into in-place segments (inplace[]: lba, len, pbn of the first block)
 * and runs to redirect (redir[]: lba, len).  Both need n+1 entries. */
static void cut(const xm_extent *recs, size_t n, uint64_t lo, uint64_t hi, uint64_t max_snap,
                xm_extent *inplace, size_t *ni, xm_extent *redir, size_t *nr)
{
    uint64_t pos = lo;
    size_t i = 0;
    *ni = *nr = 0;
    while (pos < hi) {
        while (i < n && recs[i].lba + recs[i].len <= pos)
            i++;
        uint64_t seg_end;
        int eligible = 0;
        if (i < n && recs[i].lba <= pos) {
            seg_end = recs[i].lba + recs[i].len < hi ? recs[i].lba + recs[i].len : hi;
            eligible = recs[i].birth > max_snap;
        } else {
            seg_end = i < n && recs[i].lba < hi ? recs[i].lba : hi;
        }
        if (eligible)
            inplace[(*ni)++] = (xm_extent){pos, recs[i].pbn + pos - recs[i].lba, 0,
                                           (uint32_t)(seg_end - pos), 0};
        else if (*nr > 0 && redir[*nr - 1].lba + redir[*nr - 1].len == pos)
            redir[*nr - 1].len += (uint32_t)(seg_end - pos);
        else
            redir[(*nr)++] = (xm_extent){pos, XM_HOLE, 0, (uint32_t)(seg_end - pos), 0};
        pos = seg_end;
    }
}

int xm_write_row(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf)
{
    xm_extent recs[BATCH], inplace[BATCH + 1], redir[BATCH + 1];
    xm_volstate vs;
    xm_io io;
    uint8_t vk[XM_VOL_KEY_LEN], vb[XM_VOLSTATE_LEN];
    const uint8_t *raw;
    size_t n, ni, nr;
    int more, rc;
    if ((rc = xm_io_begin(&io, st, vol, offset, length, 1, 1)) || length == 0)
        return xm_io_end(&io, rc);
    xm_put_be32(vk, vol);
    if ((rc = kv_get_fixed(st, io.txn, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, XM_VOLSTATE_LEN, &raw)))
        return xm_io_end(&io, rc == XM_ENOTFOUND ? XM_ENOVOL : rc);
    xm_volstate_decode(raw, XM_VOLSTATE_LEN, &vs);
    if (offset + length > vs.size_bytes)
        return xm_io_end(&io, XM_ERANGE);
    uint64_t lo = offset / XM_BLOCK_SIZE, hi = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    if ((rc = xm_scan_live(st, io.live, vol, lo, hi, recs, BATCH, &n, &more)))
        return xm_io_end(&io, rc);
    if (more)
        return xm_io_end(&io, XM_ESLOW);
    for (size_t i = 0; i < n; i++)
        if (recs[i].flags & XM_F_SHARED)
            return xm_io_end(&io, XM_ESLOW);
    /* Decide everything, then write: redirect (which may refuse or fail) and commit first, the
     * in-place segments last. */
    cut(recs, n, lo, hi, vs.max_snap, inplace, &ni, redir, &nr);
    for (size_t r = 0; r < nr; r++)
        if ((rc = redirect_run(st, io.txn, io.live, vol, &vs, recs, n, redir[r].lba,
                               redir[r].lba + redir[r].len, offset, length, buf)))
            return xm_io_end(&io, rc);
    if (nr > 0) {
        xm_volstate_encode(vb, &vs);
        if ((rc = kv_put(io.txn, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, vb, sizeof vb)) ||
            (rc = xm_io_commit(&io)))
            return xm_io_end(&io, rc);
        STAT_ADD(st, redirected_writes, 1);
    }
    uint64_t end = offset + length;
    for (size_t i = 0; i < ni && rc == XM_OK; i++) {
        uint64_t s = inplace[i].lba * XM_BLOCK_SIZE > offset ? inplace[i].lba * XM_BLOCK_SIZE : offset;
        uint64_t e = (inplace[i].lba + inplace[i].len) * XM_BLOCK_SIZE;
        e = e < end ? e : end;
        rc = xm_pool_write(st, vol, inplace[i].pbn, s - inplace[i].lba * XM_BLOCK_SIZE,
                           e - s, buf + (s - offset));
    }
    return xm_io_end(&io, rc);
}
