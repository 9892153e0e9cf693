/*
 * xm_bulk_rb.c - rollback as a bulk walk: the plan (what differs from the snapshot) and one
 * bounded chunk of the restore.
 *
 * Twins (bulk.py): xm_bulk_rollback_plan is py_rollback_plan (extmap.window over t's dead
 * records, extmap.live_ranges_born_after, extmap.merge_ranges); xm_bulk_rollback_apply is
 * py_rollback_apply (extmap.holes_over over each range, then extmap.copy_in of the snapshot's
 * records there, born now and SHARED), with the same database operations in the same order.
 * Encodings: xm_layout.h.
 */
#include "xm_bulk.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static int cmp_lba(const void *a, const void *b)
{
    const xm_extent *x = a, *y = b;
    if (x->lba != y->lba)
        return x->lba < y->lba ? -1 : 1;
    return x->pbn < y->pbn ? -1 : x->pbn > y->pbn; /* extents sort like Python's Extent tuples */
}

typedef struct {
    xm_extent *v;
    size_t n, cap;
} ext_list;

/* Sort by lba, stably (an LSD radix sort, skipping bytes every extent shares: qsort's merge
 * sort and its call per comparison were a tenth of a rollback's CPU).  Ties keep their order;
 * neither list has two targets at one lba (a snapshot's view does not overlap itself), and
 * the ranges' merge does not depend on the order of equal starts. */
static int ext_sort(ext_list *l)
{
    size_t n = l->n, i;
    for (i = 1; i < n && cmp_lba(&l->v[i - 1], &l->v[i]) <= 0; i++)
        ;
    if (i >= n)
        return XM_OK;
    xm_extent *tmp = malloc(n * sizeof *tmp);
    if (!tmp)
        return ENOMEM;
    bk_radix_u64(l->v, tmp, n, sizeof *l->v, offsetof(xm_extent, lba));
    free(tmp);
    return XM_OK;
}

static int ext_add(ext_list *l, xm_extent e)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 256;
        void *p = realloc(l->v, cap * sizeof *l->v);
        if (!p)
            return ENOMEM;
        l->v = p;
        l->cap = cap;
    }
    l->v[l->n++] = e;
    return XM_OK;
}

/* Targets (t's dead records with death > t, full records) and raw ranges (live records born after
 * t from LIVEBIRTH: lba, len). */
static int collect(xm_store *st, MDB_txn *t, uint32_t vol, uint64_t epoch, int indexed,
                   ext_list *targets, ext_list *raw)
{
    MDB_cursor *cur, *dc;
    uint8_t kb[XM_DEADIDX_KEY_LEN];
    MDB_val k, v;
    int rc = mdb_cursor_open(t, st->dbi[XM_DB_DEADIDX], &cur);
    if (rc)
        return xm_rc(rc);
    /* The dead records through one cursor: they come in lba order within a (death, birth)
     * group, so its search mostly stays on the page it stands on. */
    if ((rc = mdb_cursor_open(t, st->dbi[XM_DB_DEAD], &dc))) {
        mdb_cursor_close(cur);
        return xm_rc(rc);
    }
    /* extmap.window(vol, epoch + 1, INFINITY, 0, epoch) */
    xm_key_deadidx(kb, vol, epoch + 1, 0, 0);
    k = (MDB_val){sizeof kb, kb};
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0) {
        OP();
        if (k.mv_size != XM_DEADIDX_KEY_LEN) {
            rc = XM_ECORRUPT;
            break;
        }
        const uint8_t *p = k.mv_data;
        uint64_t death = xm_get_be64(p + 4), birth = xm_get_be64(p + 12), lba = xm_get_be64(p + 20);
        if (xm_get_be32(p) != vol)
            break;
        if (birth > epoch) {
            if (death >= XM_INFINITY)
                break;
            xm_key_deadidx(kb, vol, death + 1, 0, 0);
            k = (MDB_val){sizeof kb, kb};
            rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
            continue;
        }
        uint8_t dk[XM_TRIPLE_KEY_LEN];
        const uint8_t *raw_rec;
        xm_rec r;
        xm_key_triple(dk, vol, lba, birth);
        OP();
        MDB_val dkv = {sizeof dk, dk}, dv;
        if ((rc = mdb_cursor_get(dc, &dkv, &dv, MDB_SET_KEY))) {
            rc = rc == MDB_NOTFOUND ? XM_ECORRUPT : xm_rc(rc); /* DEADIDX names a missing record */
            break;
        }
        if (dv.mv_size != XM_REC_LEN || !xm_in_map(st, dv.mv_data, dv.mv_size)) {
            rc = XM_ECORRUPT;
            break;
        }
        raw_rec = dv.mv_data;
        if (xm_rec_decode(raw_rec, XM_REC_LEN, &r)) {
            rc = XM_ECORRUPT;
            break;
        }
        if ((rc = ext_add(targets, (xm_extent){lba, r.pbn, birth, r.len, r.flags})))
            break;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    mdb_cursor_close(dc);
    if (rc != MDB_NOTFOUND && rc != 0)
        return xm_rc(rc);
    if (!indexed)
        return XM_OK;
    if ((rc = mdb_cursor_open(t, st->dbi[XM_DB_LIVEBIRTH], &cur)))
        return xm_rc(rc);
    xm_key_triple(kb, vol, epoch + 1, 0);
    k = (MDB_val){XM_TRIPLE_KEY_LEN, kb};
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0) {
        OP();
        if (k.mv_size != XM_TRIPLE_KEY_LEN || xm_get_be32(k.mv_data) != vol)
            break;
        if (v.mv_size != XM_U32_LEN) {
            rc = XM_ECORRUPT;
            break;
        }
        uint64_t lba = xm_get_be64((const uint8_t *)k.mv_data + 12);
        if ((rc = ext_add(raw, (xm_extent){lba, 0, 0, xm_get_le32(v.mv_data), 0})))
            break;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND || rc == 0 ? XM_OK : xm_rc(rc);
}

int xm_bulk_rollback_plan(xm_store *st, uint32_t vol, uint64_t epoch, int birth_indexed,
                          uint64_t pos, xm_extent **ranges, size_t *nr, xm_extent **targets,
                          size_t *nt, uint64_t *weight)
{
    ext_list tg = {0}, raw = {0};
    MDB_txn *t;
    int rc = xm_rtxn_get(st, &t);
    if (rc)
        return rc;
    rc = collect(st, t, vol, epoch, birth_indexed, &tg, &raw);
    xm_rtxn_put(st, t);
    /* merged ranges of the live ranges and the targets' ranges, each with the number of raw
     * ranges starting in it (the chunking weight, in .birth); .pbn is the range's end */
    size_t live_n = raw.n;
    for (size_t i = 0; i < tg.n && rc == XM_OK; i++)
        rc = ext_add(&raw, (xm_extent){tg.v[i].lba, 0, 0, tg.v[i].len, 0});
    if (rc == XM_OK && (rc = ext_sort(&raw)) == XM_OK)
        rc = ext_sort(&tg);
    if (rc == XM_OK) {
        (void)live_n;
        size_t m = 0;
        for (size_t i = 0; i < raw.n; i++) {
            uint64_t a = raw.v[i].lba, b = a + raw.v[i].len;
            if (m > 0 && a <= raw.v[m - 1].pbn) {
                if (b > raw.v[m - 1].pbn)
                    raw.v[m - 1].pbn = b;
                raw.v[m - 1].birth++;
            } else {
                raw.v[m++] = (xm_extent){a, b, 1, 0, 0};
            }
        }
        /* only what lies at or above pos is still to restore */
        size_t r0 = 0, t0 = 0;
        while (r0 < m && raw.v[r0].lba < pos)
            r0++;
        while (t0 < tg.n && tg.v[t0].lba < pos)
            t0++;
        *nr = m - r0;
        *nt = tg.n - t0;
        *weight = 0;
        for (size_t i = r0; i < m; i++)
            *weight += raw.v[i].birth;
        *ranges = malloc((*nr + 1) * sizeof *raw.v);
        *targets = malloc((*nt + 1) * sizeof *tg.v);
        if (!*ranges || !*targets) {
            free(*ranges);
            free(*targets);
            *ranges = *targets = NULL;
            rc = ENOMEM;
        } else {
            memcpy(*ranges, raw.v + r0, *nr * sizeof *raw.v);
            memcpy(*targets, tg.v + t0, *nt * sizeof *tg.v);
        }
    }
    free(tg.v);
    free(raw.v);
    return rc;
}

void xm_bulk_free(void *p)
{
    free(p);
}

/* ---- apply ------------------------------------------------------------------------------ */

int bk_live_put(chunk *c, uint32_t vol, xm_volstate *vs, const xm_extent *e)
{
    uint8_t k[XM_TRIPLE_KEY_LEN], v[XM_REC_LEN];
    xm_rec_encode(v, &(xm_rec){e->len, e->flags, e->pbn, e->birth});
    xm_key_live(k, vol, e->lba);
    int rc = bk_cput(c, XM_DB_LIVE, k, XM_LIVE_KEY_LEN, v, XM_REC_LEN);
    if (rc || vs->nsnaps == 0)
        return rc;
    xm_key_triple(k, vol, e->birth, e->lba);
    xm_put_le32(v, e->len);
    vs->flags |= XM_VS_BIRTH_INDEXED;
    return bk_cput(c, XM_DB_LIVEBIRTH, k, XM_TRIPLE_KEY_LEN, v, XM_U32_LEN);
}

/* Drop a live record and its LIVEBIRTH entry.  `overwritten`: a copy born now will be put at
 * the same lba in this transaction (hole), so the LIVE delete is skipped, and so is the
 * LIVEBIRTH one when the record was born now too (same key) and the copy gets an entry. */
static int live_del(chunk *c, uint32_t vol, const xm_volstate *vs, const xm_extent *e,
                    int overwritten)
{
    uint8_t k[XM_TRIPLE_KEY_LEN];
    xm_key_live(k, vol, e->lba);
    int rc = overwritten ? XM_OK : bk_cdel(c, XM_DB_LIVE, k, XM_LIVE_KEY_LEN);
    if (rc || !(vs->flags & XM_VS_BIRTH_INDEXED))
        return rc;
    if (overwritten && e->birth == vs->epoch && vs->nsnaps != 0)
        return XM_OK;
    xm_key_triple(k, vol, e->birth, e->lba);
    return bk_cdel(c, XM_DB_LIVEBIRTH, k, XM_TRIPLE_KEY_LEN);
}

/* extmap.add_dead */
static int add_dead(chunk *c, uint32_t vol, const xm_extent *e, uint64_t death)
{
    uint8_t k[XM_DEADIDX_KEY_LEN], v[XM_REC_LEN];
    const uint8_t *old;
    int rc;
    xm_key_triple(k, vol, e->lba, e->birth);
    xm_rec_encode(v, &(xm_rec){e->len, e->flags, e->pbn, death});
    if ((rc = bk_cput(c, XM_DB_DEAD, k, XM_TRIPLE_KEY_LEN, v, XM_REC_LEN)))
        return rc;
    xm_key_deadidx(k, vol, death, e->birth, e->lba);
    xm_put_le32(v, e->len);
    if ((rc = bk_cput(c, XM_DB_DEADIDX, k, XM_DEADIDX_KEY_LEN, v, XM_U32_LEN)))
        return rc;
    uint64_t n = 0;
    rc = bk_get_fixed(c->st, c->t, c->st->dbi[XM_DB_COUNTERS], k, XM_TRIPLE_KEY_LEN, XM_U64_LEN, &old);
    if (rc == XM_OK)
        n = xm_get_le64(old);
    else if (rc != XM_ENOTFOUND)
        return rc;
    xm_put_le64(v, n + e->len);
    return bk_put(c->t, c->st->dbi[XM_DB_COUNTERS], k, XM_TRIPLE_KEY_LEN, v, XM_U64_LEN);
}

/* allocator.share: one more record holds [pbn, pbn+n). */
int bk_share(chunk *c, uint64_t pbn, uint64_t n)
{
    refs_run runs[XM_MAX_EXTENT + 1];
    size_t nr;
    uint64_t end = pbn + n, pos = pbn;
    int rc = bk_refs_overlapping(c, pbn, end, runs, XM_MAX_EXTENT + 1, &nr);
    for (size_t i = 0; i < nr && rc == XM_OK && pos < end; i++) {
        const refs_run *r = &runs[i];
        if (r->s > pos) {
            uint64_t stop = r->s < end ? r->s : end;
            rc = bk_put_refs(c, pos, stop - pos, 2);
            pos = stop;
        }
        if (rc || pos >= end)
            break;
        uint64_t stop = r->s + r->len < end ? r->s + r->len : end;
        if (stop > pos) {
            rc = bk_set_refs(c, r, pos, stop, r->refs + 1);
            pos = stop;
        }
    }
    if (rc == XM_OK && pos < end)
        rc = bk_put_refs(c, pos, end - pos, 2);
    return rc;
}

/* Is there a target starting at lba (targets sorted by lba)? */
static int copied_at(const xm_extent *tg, size_t nt, uint64_t lba)
{
    size_t lo = 0, hi = nt;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (tg[mid].lba < lba)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < nt && tg[lo].lba == lba;
}

/* extmap.overlay of a hole over [lba, lba+n), then extmap.kill of each covered piece.
 * A record wholly inside the hole, where one of the chunk's targets (tg) will be copied to the
 * same key, is not deleted from LIVE: the copy's put overwrites it (one B-tree update, not
 * two).  Until then it is stale, but no later hole of this chunk can see it: their scans start
 * at least one block past this hole's end (merged ranges leave a gap; one hole per range,
 * `single`, else no skipping).  Released blocks of a record not flagged SHARED go straight to
 * PENDING: such a record is its blocks' only holder (check.py's invariant), so REFS has
 * nothing for them. */
static int hole(chunk *c, MDB_cursor *cur, uint32_t vol, xm_volstate *vs, uint64_t lba, uint64_t n,
                const xm_extent *tg, size_t nt, int single)
{
    size_t cap = 64, no, nk, ng;
    int more, rc;
    xm_extent *old = NULL, *keep = NULL, *gone = NULL;
    uint64_t lo = lba > 0 ? lba - 1 : 0;
    for (;;) { /* Txn.live_overlap: grow until every record fits */
        free(old);
        if (!(old = malloc(cap * sizeof *old)))
            return ENOMEM;
        if ((rc = xm_scan_live(c->st, cur, vol, lo, lba + n + 1, old, cap, &no, &more)))
            goto out;
        if (!more)
            break;
        cap = cap * 4 > n + 2 ? cap * 4 : n + 2;
    }
    keep = malloc((no + 2) * sizeof *keep);
    gone = malloc((no + 1) * sizeof *gone);
    if (!keep || !gone) {
        rc = ENOMEM;
        goto out;
    }
    xm_extent nw = {lba, XM_HOLE, 0, (uint32_t)n, 0};
    if ((rc = xm_insert(old, no, &nw, XM_MAX_EXTENT, keep, &nk, gone, &ng)))
        goto out;
    for (size_t i = 0; i < no && rc == XM_OK; i++) {
        int kept = 0;
        for (size_t j = 0; j < nk && !kept; j++)
            kept = memcmp(&old[i], &keep[j], sizeof old[i]) == 0;
        if (!kept)
            rc = live_del(c, vol, vs, &old[i],
                          single && old[i].lba >= lba && old[i].lba + old[i].len <= lba + n &&
                              copied_at(tg, nt, old[i].lba));
    }
    for (size_t j = 0; j < nk && rc == XM_OK; j++) {
        int existed = 0;
        for (size_t i = 0; i < no && !existed; i++)
            existed = memcmp(&old[i], &keep[j], sizeof old[i]) == 0;
        if (!existed)
            rc = bk_live_put(c, vol, vs, &keep[j]);
    }
    for (size_t i = 0; i < ng && rc == XM_OK; i++) {
        vs->live_blocks -= gone[i].len;
        if (gone[i].birth <= vs->max_snap)
            rc = add_dead(c, vol, &gone[i], vs->epoch);
        else if (gone[i].flags & XM_F_SHARED)
            rc = bk_release(c, gone[i].pbn, gone[i].len);
        else
            rc = bk_release_own(c, gone[i].pbn, gone[i].len);
    }
out:
    free(old);
    free(keep);
    free(gone);
    return rc;
}

int xm_bulk_rollback_apply(xm_store *st, uint32_t vol, const xm_extent *plan_ranges,
                           size_t plan_nr, const xm_extent *plan_targets, size_t plan_nt,
                           size_t *k, size_t *ti, uint64_t limit, const void *pos_key,
                           size_t pklen, uint64_t punch_min, uint64_t *ndone)
{
    /* The chunk: ranges from *k while none is taken or their weight is under limit, and the
     * targets that lie in them (bulk.py's slicing, the same in both twins). */
    const xm_extent *ranges = plan_ranges + *k, *targets = plan_targets + *ti;
    size_t nr = 0, nt = 0;
    uint64_t n = 0;
    while (*k + nr < plan_nr && (nr == 0 || n < limit))
        n += ranges[nr++].birth;
    if (nr == 0) {
        *ndone = 0;
        return XM_OK;
    }
    uint64_t pos = ranges[nr - 1].pbn;
    while (*ti + nt < plan_nt && targets[nt].lba < pos)
        nt++;
    chunk c;
    xm_volstate vs;
    MDB_cursor *cur = NULL;
    uint8_t vk[XM_VOL_KEY_LEN], vb[XM_VOLSTATE_LEN];
    const uint8_t *raw;
    int rc = bk_begin(&c, st);
    if (rc)
        return rc;
    xm_put_be32(vk, vol);
    if ((rc = bk_get_fixed(st, c.t, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, XM_VOLSTATE_LEN, &raw)))
        return bk_end(&c, rc == XM_ENOTFOUND ? XM_ENOVOL : rc, punch_min);
    xm_volstate_decode(raw, XM_VOLSTATE_LEN, &vs);
    if ((rc = mdb_cursor_open(c.t, st->dbi[XM_DB_LIVE], &cur)))
        return bk_end(&c, xm_rc(rc), punch_min);
    for (size_t i = 0; i < nr && rc == XM_OK; i++) /* extmap.holes_over */
        for (uint64_t p = ranges[i].lba; p < ranges[i].pbn && rc == XM_OK; p += 1 << 20) {
            uint64_t n = ranges[i].pbn - p < (1 << 20) ? ranges[i].pbn - p : (1 << 20);
            rc = hole(&c, cur, vol, &vs, p, n, targets, nt, ranges[i].pbn - ranges[i].lba == n);
        }
    mdb_cursor_close(cur);
    for (size_t i = 0; i < nt && rc == XM_OK; i++) { /* extmap.copy_in */
        const xm_extent *e = &targets[i];
        for (uint64_t p = 0; p < e->len && rc == XM_OK; p += XM_MAX_EXTENT) {
            uint64_t n = e->len - p < XM_MAX_EXTENT ? e->len - p : XM_MAX_EXTENT;
            xm_extent cp = {e->lba + p, e->pbn + p, vs.epoch, (uint32_t)n, XM_F_SHARED};
            if ((rc = bk_live_put(&c, vol, &vs, &cp)) == XM_OK)
                rc = bk_share(&c, e->pbn + p, n);
        }
        vs.live_blocks += e->len;
    }
    if (nt > 0)
        vs.flags |= XM_VS_SHARED;
    if (rc == XM_OK) {
        uint8_t pv[XM_U64_LEN];
        xm_volstate_encode(vb, &vs);
        xm_put_le64(pv, pos);
        if ((rc = bk_put(c.t, st->dbi[XM_DB_VOLSTATE], vk, sizeof vk, vb, sizeof vb)) == XM_OK)
            rc = bk_put(c.t, st->dbi[XM_DB_META], pos_key, pklen, pv, sizeof pv);
    }
    if ((rc = bk_end(&c, rc, punch_min)) == XM_OK) {
        *k += nr;
        *ti += nt;
        *ndone = n;
    }
    return rc;
}
