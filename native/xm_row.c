/*
 * xm_row.c - the redirect-on-write write path, xm_write_row.
 *
 * The C twin of the common case of the Python engine's general write (Engine._write_locked)
 * together with extmap.overlay/kill and allocator.allocate.  Every record it covers is held by
 * a snapshot or by another record (SHARED: a clone's or a rollback's blocks, and its origin's),
 * or it would have been written in place.  The covered parts become dead records when a
 * snapshot of the volume holds them; SHARED parts no snapshot holds are released by the batch
 * that applies the write (ov_ent.release, xm_row_overlay_c: one holder fewer in REFS, PENDING
 * when it was the last).  It writes the same bytes to the same databases as its twin (a
 * differential test compares every database after the same writes, clones and rollbacks).
 *
 * Order: everything that can refuse or fail the redirect comes first (ESLOW, ENOSPC from the
 * allocator or the filesystem, a full map, the commit); the in-place parts of the request are
 * written last, after the commit.  So a request answered ESLOW or ENOSPC has written nothing the
 * general path would not rewrite, and data reaches newly allocated blocks before the map that
 * points at them commits.  Encodings: xm_layout.h.
 */
#include "xm_bulk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RUNS 16 /* allocation runs per redirected run: more is too fragmented for C */

_Static_assert(sizeof(xm_extent) == 32, "xm_extent has no padding (compared with memcmp)");

int xm_row_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl)
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
int xm_row_get_fixed(xm_store *st, MDB_txn *t, MDB_dbi d, const void *k, size_t kl, size_t want,
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
    int rc = xm_row_put(t, st->dbi[XM_DB_LIVE], k, XM_LIVE_KEY_LEN, v, XM_REC_LEN);
    if (rc || vs->nsnaps == 0)
        return rc;
    xm_key_triple(k, vol, e->birth, e->lba);
    xm_put_le32(v, e->len);
    vs->flags |= XM_VS_BIRTH_INDEXED;
    return xm_row_put(t, st->dbi[XM_DB_LIVEBIRTH], k, XM_TRIPLE_KEY_LEN, v, XM_U32_LEN);
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

static int counters_add(xm_store *st, MDB_txn *t, uint32_t vol, uint64_t death, uint64_t birth,
                        uint64_t add)
{
    uint8_t k[XM_DEADIDX_KEY_LEN], v[XM_U64_LEN];
    const uint8_t *old;
    xm_key_deadidx(k, vol, death, birth, 0); /* COUNTERS key: its first 20 bytes */
    uint64_t n = 0;
    int rc = xm_row_get_fixed(st, t, st->dbi[XM_DB_COUNTERS], k, XM_TRIPLE_KEY_LEN, XM_U64_LEN, &old);
    if (rc == XM_OK)
        n = xm_get_le64(old);
    else if (rc != XM_ENOTFOUND)
        return rc;
    xm_put_le64(v, n + add);
    return xm_row_put(t, st->dbi[XM_DB_COUNTERS], k, XM_TRIPLE_KEY_LEN, v, XM_U64_LEN);
}

int xm_row_counters_flush(xm_store *st, MDB_txn *t, xm_row_counters *cnt)
{
    int rc = XM_OK;
    for (size_t i = 0; i < cnt->n && rc == XM_OK; i++)
        rc = counters_add(st, t, cnt->k[i].vol, cnt->k[i].death, cnt->k[i].birth, cnt->k[i].add);
    cnt->n = 0;
    return rc;
}

/* The covered part of a record a snapshot holds: a dead record, its DEADIDX entry, COUNTERS
 * (now, or summed in cnt until xm_row_counters_flush). */
static int add_dead(xm_store *st, MDB_txn *t, uint32_t vol, const xm_extent *e, uint64_t death,
                    xm_row_counters *cnt)
{
    uint8_t k[XM_DEADIDX_KEY_LEN], v[XM_REC_LEN];
    int rc;
    xm_key_triple(k, vol, e->lba, e->birth);
    xm_rec_encode(v, &(xm_rec){e->len, e->flags, e->pbn, death});
    if ((rc = xm_row_put(t, st->dbi[XM_DB_DEAD], k, XM_TRIPLE_KEY_LEN, v, XM_REC_LEN)))
        return rc;
    xm_key_deadidx(k, vol, death, e->birth, e->lba);
    xm_put_le32(v, e->len);
    if ((rc = xm_row_put(t, st->dbi[XM_DB_DEADIDX], k, XM_DEADIDX_KEY_LEN, v, XM_U32_LEN)))
        return rc;
    if (!cnt)
        return counters_add(st, t, vol, death, e->birth, e->len);
    for (size_t i = 0; i < cnt->n; i++)
        if (cnt->k[i].vol == vol && cnt->k[i].death == death && cnt->k[i].birth == e->birth) {
            cnt->k[i].add += e->len;
            return XM_OK;
        }
    if (cnt->n == XM_ROW_COUNTERS && (rc = xm_row_counters_flush(st, t, cnt)))
        return rc;
    cnt->k[cnt->n].vol = vol;
    cnt->k[cnt->n].death = death;
    cnt->k[cnt->n].birth = e->birth;
    cnt->k[cnt->n++].add = e->len;
    return XM_OK;
}

/* META value of two u64s (alloc, blocks); absent reads as zeros, like the Python twin. */
int xm_row_meta_get2(xm_store *st, MDB_txn *t, const char *name, uint64_t out[2])
{
    const uint8_t *p;
    int rc = xm_row_get_fixed(st, t, st->dbi[XM_DB_META], name, strlen(name), XM_U64X2_LEN, &p);
    out[0] = out[1] = 0;
    if (rc == XM_ENOTFOUND)
        return XM_OK;
    if (rc == XM_OK) {
        out[0] = xm_get_le64(p);
        out[1] = xm_get_le64(p + 8);
    }
    return rc;
}

int xm_row_meta_put2(xm_store *st, MDB_txn *t, const char *name, const uint64_t v[2])
{
    uint8_t b[XM_U64X2_LEN];
    xm_put_le64(b, v[0]);
    xm_put_le64(b + 8, v[1]);
    return xm_row_put(t, st->dbi[XM_DB_META], name, strlen(name), b, sizeof b);
}

/* One FREE run under the cursor, validated. */
int xm_row_free_run(const xm_store *st, const MDB_val *k, const MDB_val *v, uint64_t *pbn, uint64_t *len)
{
    if (k->mv_size != XM_PBN_KEY_LEN || v->mv_size != XM_U64_LEN || !xm_in_map(st, k->mv_data, 8) ||
        !xm_in_map(st, v->mv_data, 8))
        return XM_ECORRUPT;
    *pbn = xm_get_be64(k->mv_data);
    *len = xm_get_le64(v->mv_data);
    return *len == 0 || *pbn > UINT64_MAX / XM_BLOCK_SIZE - *len ? XM_ECORRUPT : XM_OK;
}

/* Twin of extmap.overlay followed by kill: nw becomes current over its range; the covered
 * parts of the old records become dead records (death = nw's birth) or, through rel, are
 * released (xm_internal.h).  COUNTERS are summed in cnt (a batch: xm_batch.c). */
int xm_row_overlay_c(xm_store *st, MDB_txn *t, MDB_cursor *c, uint32_t vol, xm_volstate *vs,
                     const xm_extent *nw, xm_row_counters *cnt, struct bk_chunk *rel)
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
    /* A dropped record whose key a kept piece reuses (the left part of a split: same lba and
     * birth, so the same LIVE and LIVEBIRTH keys) is not deleted: the piece's put overwrites
     * both values (2 B-tree updates fewer per redirected block inside a record).  Only when
     * that put writes LIVEBIRTH too (nsnaps) or there is none (not BIRTH_INDEXED). */
    int reuse_ok = vs->nsnaps != 0 || !(vs->flags & XM_VS_BIRTH_INDEXED);
    for (size_t i = 0; i < n; i++) {
        int kept = 0, reused = 0;
        for (size_t j = 0; j < nk && !kept; j++) {
            kept = memcmp(&old[i], &keep[j], sizeof old[i]) == 0;
            reused |= reuse_ok && keep[j].lba == old[i].lba && keep[j].birth == old[i].birth;
        }
        if (!kept && !reused && (rc = live_del(st, t, vol, vs, &old[i])))
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
        if (rel) {
            /* extmap.kill's release: no snapshot held the part when it was overwritten (a
             * snapshot taken since is not older than nw, so it never saw the part either) */
            if (!(gone[i].flags & XM_F_SHARED))
                return XM_ECORRUPT; /* cannot happen: the volume's own blocks go in place */
            rc = bk_release(rel, gone[i].pbn, gone[i].len);
        } else if (gone[i].birth > vs->max_snap) {
            return XM_ECORRUPT; /* cannot happen: such parts are written in place */
        } else {
            /* death = the new record's birth: the entry may be applied after a snapshot that
             * followed its write (xm_batch.c: entries survive snapshots), when vs->epoch
             * moved on */
            rc = add_dead(st, t, vol, &gone[i], nw->birth, cnt);
            xm_drop_add(st, gone[i].pbn, gone[i].len); /* only a snapshot reads it now */
        }
        if (rc)
            return rc;
        vs->live_blocks -= gone[i].len;
    }
    vs->live_blocks += nw->len;
    return XM_OK;
}

/* Full-block content of blocks [a, b) for a write of [offset, offset+length): the new data,
 * and the old content of partly written first and last blocks (read-modify-write). */
static int fill_blocks(xm_store *st, uint32_t vol, const xm_extent *recs, size_t n, uint64_t a, uint64_t b,
                       uint64_t offset, uint64_t length, const uint8_t *buf, uint8_t *out)
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
                int rc = xm_pool_read(st, vol, recs[j].pbn + blk - recs[j].lba, blk, 0, XM_BLOCK_SIZE,
                                      out + (blk - a) * XM_BLOCK_SIZE);
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

/* [lo, hi) cut block by block into in-place segments (inplace[]: lba, len, pbn of the first
 * block: a block in the overlay, or a record born after the newest snapshot that no other
 * record holds, i.e. not SHARED) and runs to
 * redirect (redir[]: lba, len).  Both need hi - lo entries. */
static void cut(const xm_extent *recs, size_t n, const xm_ovhits *ov, uint64_t lo, uint64_t hi,
                uint64_t max_snap, xm_extent *inplace, size_t *ni, xm_extent *redir, size_t *nr)
{
    size_t i = 0, j = 0;
    *ni = *nr = 0;
    for (uint64_t b = lo; b < hi; b++) {
        while (i < n && recs[i].lba + recs[i].len <= b)
            i++;
        while (j < ov->n && ov->hit[j].lba < b)
            j++;
        uint64_t pbn = XM_HOLE;
        if (j < ov->n && ov->hit[j].lba == b) {
            if (ov->hit[j].birth > max_snap) /* else redirected: it supersedes the entry */
                pbn = ov->hit[j].pbn;
        } else if (i < n && recs[i].lba <= b && recs[i].birth > max_snap &&
                   !(recs[i].flags & XM_F_SHARED)) {
            pbn = recs[i].pbn + (b - recs[i].lba); /* a SHARED block has other holders */
        }
        if (pbn != XM_HOLE) {
            xm_extent *l = *ni ? &inplace[*ni - 1] : NULL;
            if (l && l->lba + l->len == b && l->pbn + l->len == pbn)
                l->len++;
            else
                inplace[(*ni)++] = (xm_extent){b, pbn, 0, 1, 0};
        } else if (*nr > 0 && redir[*nr - 1].lba + redir[*nr - 1].len == b) {
            redir[*nr - 1].len++;
        } else {
            redir[(*nr)++] = (xm_extent){b, XM_HOLE, 0, 1, 0};
        }
    }
}

/* The redirected runs: fill each with its full-block content and write it to reserved blocks
 * (blocks[]: lba, pbn, len per piece, at most cap pieces), before anything is published. */
static int write_redirected(xm_store *st, uint32_t vol, const xm_extent *recs, size_t n, const xm_extent *redir,
                            size_t nr, const xm_extent *runs, size_t nruns, uint64_t offset,
                            uint64_t length, const uint8_t *buf, xm_extent *blocks, size_t cap,
                            size_t *nb)
{
    size_t ri = 0;
    uint64_t rused = 0;
    int rc = XM_OK;
    *nb = 0;
    for (size_t r = 0; r < nr && rc == XM_OK; r++) {
        uint64_t a = redir[r].lba, b = a + redir[r].len;
        uint8_t *data = malloc((b - a) * XM_BLOCK_SIZE);
        if (!data)
            return ENOMEM;
        rc = fill_blocks(st, vol, recs, n, a, b, offset, length, buf, data);
        for (uint64_t pos = a; pos < b && rc == XM_OK;) {
            uint64_t m = runs[ri].len - rused < b - pos ? runs[ri].len - rused : b - pos;
            if (*nb >= cap) {
                rc = XM_ESLOW;
                break;
            }
            blocks[(*nb)++] = (xm_extent){pos, runs[ri].pbn + rused, 0, (uint32_t)m, 0};
            rc = xm_pool_write(st, vol, runs[ri].pbn + rused, pos, 0, m * XM_BLOCK_SIZE,
                               data + (pos - a) * XM_BLOCK_SIZE);
            pos += m;
            rused += m;
            if (rused == runs[ri].len) {
                ri++;
                rused = 0;
            }
        }
        free(data);
    }
    return rc;
}

/* One attempt of xm_write_row; XM_EAGAIN_ROW: start over (see xm_batch.c). */
static int write_row_once(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length,
                          const uint8_t *buf, xm_extent *inplace, xm_extent *redir, int *moved)
{
    xm_extent recs[BATCH], runs[MAX_RUNS], blocks[2 * MAX_RUNS + BATCH];
    xm_volstate vs;
    xm_io io;
    xm_ovhits ov = {.for_write = 1};
    uint8_t vk[XM_VOL_KEY_LEN];
    const uint8_t *raw;
    size_t n, ni, nr, nruns, nb;
    int more, rc;
    if ((rc = xm_io_begin_ov(&io, st, vol, offset, length, 1, &ov)) || length == 0)
        goto end;
    xm_put_be32(vk, vol);
    if ((rc = xm_row_get_fixed(st, io.txn, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, XM_VOLSTATE_LEN,
                               &raw))) {
        rc = rc == XM_ENOTFOUND ? XM_ENOVOL : rc;
        goto end;
    }
    xm_volstate_decode(raw, XM_VOLSTATE_LEN, &vs);
    uint64_t lo = offset / XM_BLOCK_SIZE, hi = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    if ((rc = xm_scan_live(st, io.live, vol, lo, hi, recs, BATCH, &n, &more)))
        goto end;
    if (more) {
        rc = XM_ESLOW;
        goto end;
    }
    /* An overlay entry born at or before the newest snapshot (it survived the snapshot, not
     * yet applied): a snapshot holds its block, which must not be rewritten in place.  The
     * block is redirected and its new entry supersedes the old one (xm_ov_insert), which the
     * batch applies first, so it becomes the snapshot's dead record.  Only for a block this
     * write covers whole (a partial one would need the old entry's content, and fill_blocks
     * reads the map's); otherwise the batch goes to LMDB first (outside the gate) and the
     * write starts over on the map that has it. */
    for (size_t i = 0; i < ov.n; i++) {
        uint64_t bs = ov.hit[i].lba * XM_BLOCK_SIZE;
        if (ov.hit[i].birth <= vs.max_snap &&
            (bs < offset || bs + XM_BLOCK_SIZE > offset + length)) {
            rc = XM_EAGAIN_ROW + 1;
            goto end;
        }
    }
    cut(recs, n, &ov, lo, hi, vs.max_snap, inplace, &ni, redir, &nr);
    uint64_t need = 0;
    for (size_t r = 0; r < nr; r++)
        need += redir[r].len;
    if (need > 0) {
        if (xm_ov_full(st, need)) {
            rc = XM_EAGAIN_ROW + 1; /* apply the batch outside the gate, then again */
            goto end;
        }
        if ((rc = xm_ov_alloc(st, need, runs, MAX_RUNS, &nruns)))
            goto end;
        rc = write_redirected(st, vol, recs, n, redir, nr, runs, nruns, offset, length, buf, blocks,
                              sizeof blocks / sizeof blocks[0], &nb);
        if (rc) {
            xm_ov_discard(st, runs, nruns);
            goto end;
        }
        if ((rc = xm_ov_insert(st, vol, blocks, nb, vs.epoch, vs.max_snap, ov.gen, runs, nruns, recs,
                               n)))
            goto end;
        STAT_ADD(st, redirected_writes, 1);
        *moved = 1;
    }
    /* The in-place parts last: a refused or failed redirect wrote nothing over the volume's
     * blocks. */
    uint64_t end = offset + length;
    for (size_t i = 0; i < ni && rc == XM_OK; i++) {
        uint64_t s = inplace[i].lba * XM_BLOCK_SIZE > offset ? inplace[i].lba * XM_BLOCK_SIZE : offset;
        uint64_t e = (inplace[i].lba + inplace[i].len) * XM_BLOCK_SIZE;
        e = e < end ? e : end;
        rc = xm_pool_write(st, vol, inplace[i].pbn, inplace[i].lba, s - inplace[i].lba * XM_BLOCK_SIZE, e - s,
                           buf + (s - offset));
    }
end:
    xm_ov_free(&ov);
    return xm_io_end(&io, rc);
}

int xm_write_row(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf)
{
    int moved;
    return xm_write_row_ex(st, vol, offset, length, buf, &moved);
}

int xm_write_row_ex(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf,
                    int *moved)
{
    *moved = 0;
    uint64_t nblk = length ? (offset % XM_BLOCK_SIZE + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE : 0;
    if (nblk > st->ov_max / 2)
        return XM_ESLOW; /* a huge write: the general path, in one transaction */
    /* A full filesystem: no new map records before the metadata has room (xm_space.c); the
     * general path then answers ENOSPC. */
    int src = xm_space_check(st, XM_SPACE_GROW);
    if (src)
        return src;
    xm_extent *inplace = malloc((nblk + 1) * sizeof *inplace);
    xm_extent *redir = malloc((nblk + 1) * sizeof *redir);
    int rc = inplace && redir ? XM_EAGAIN_ROW : ENOMEM;
    for (int attempt = 0; attempt < 8 && (rc == XM_EAGAIN_ROW || rc == XM_EAGAIN_ROW + 1); attempt++) {
        /* The batch first (outside the gate), so that the write does not end in the general
         * path, which would apply it while holding the gate.  Preemptible, and not while a
         * snapshot is being taken: a snapshot must not wait for a whole batch and its msync
         * (this used to be a non-preemptible batch on the second try: snapshot commit_ms of
         * 100+ ms under load). */
        if (rc == XM_EAGAIN_ROW + 1) {
            xm_batch_wait_snapshots(st);
            if ((rc = xm_batch_commit_preemptible(st)))
                break;
        }
        /* reserve outside the gate: it may wait for LMDB's writer lock */
        if ((rc = xm_ov_ensure(st, nblk)) && rc != ENOSPC)
            break;
        rc = write_row_once(st, vol, offset, length, buf, inplace, redir, moved);
    }
    if (rc == XM_EAGAIN_ROW || rc == XM_EAGAIN_ROW + 1)
        rc = XM_ESLOW;
    free(inplace);
    free(redir);
    return rc;
}
