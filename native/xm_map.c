/*
 * xm_map.c - pure extent-map routines: no LMDB, no files, no allocation.
 *
 * Every routine here has a line-for-line twin in src/snapdisk/extmap_ref.py; the hypothesis
 * tests in tests/test_extmap_diff.py feed both the same random inputs and compare the outputs,
 * so a change to one must be made to the other.
 */
#include "xm.h"

/* Append run r to out[], merging it into the previous run when both are holes, or both are
 * mapped and physically contiguous (one pread instead of two). */
static int plan_emit(xm_extent *out, size_t cap, size_t *k, xm_extent r)
{
    if (*k > 0) {
        xm_extent *p = &out[*k - 1];
        if (p->pbn == XM_HOLE && r.pbn == XM_HOLE) {
            p->len += r.len;
            return XM_OK;
        }
        if (p->pbn != XM_HOLE && r.pbn != XM_HOLE && p->pbn + p->len == r.pbn) {
            p->len += r.len;
            return XM_OK;
        }
    }
    if (*k >= cap)
        return XM_ESPACE;
    out[(*k)++] = r;
    return XM_OK;
}

/* Walks ext[] over [lba, lba+nblocks) and calls emit for each mapped piece and each hole.
 * Shared by xm_plan and xm_extents, which differ only in how they merge. */
typedef int (*emit_fn)(xm_extent *, size_t, size_t *, xm_extent);

static int walk(const xm_extent *ext, size_t n, uint64_t lba, uint64_t nblocks,
                xm_extent *out, size_t cap, size_t *nout, emit_fn emit)
{
    uint64_t pos = lba, end = lba + nblocks, prev_end = 0;
    size_t k = 0;
    int rc;
    for (size_t i = 0; i < n; i++) {
        const xm_extent *e = &ext[i];
        uint64_t e_end = e->lba + e->len;
        if (e->len == 0 || (i > 0 && e->lba < prev_end))
            return XM_ECORRUPT;
        prev_end = e_end;
        if (e_end <= pos)
            continue;
        if (e->lba >= end)
            break;
        if (e->lba > pos) {
            xm_extent h = {pos, XM_HOLE, 0, (uint32_t)(e->lba - pos), 0};
            if ((rc = emit(out, cap, &k, h)))
                return rc;
        }
        uint64_t s = e->lba > pos ? e->lba : pos;
        uint64_t t = e_end < end ? e_end : end;
        xm_extent m = {s, e->pbn + (s - e->lba), e->birth, (uint32_t)(t - s), e->flags};
        if ((rc = emit(out, cap, &k, m)))
            return rc;
        pos = t;
    }
    /* A hole longer than 2^32-1 blocks is cut, since len is 32 bits. */
    while (pos < end) {
        uint64_t l = end - pos > 0xFFFFFFFFu ? 0xFFFFFFFFu : end - pos;
        xm_extent h = {pos, XM_HOLE, 0, (uint32_t)l, 0};
        if ((rc = emit(out, cap, &k, h)))
            return rc;
        pos += l;
    }
    *nout = k;
    return XM_OK;
}

int xm_plan(const xm_extent *ext, size_t n, uint64_t lba, uint64_t nblocks,
            xm_extent *out, size_t cap, size_t *nout)
{
    return walk(ext, n, lba, nblocks, out, cap, nout, plan_emit);
}

/* Block status only cares about allocated vs hole, so every mapped neighbour merges. */
static int status_emit(xm_extent *out, size_t cap, size_t *k, xm_extent r)
{
    r.pbn = r.pbn == XM_HOLE ? XM_HOLE : 0;
    r.birth = 0;
    r.flags = 0;
    if (*k > 0 && out[*k - 1].pbn == r.pbn && (uint64_t)out[*k - 1].len + r.len <= 0xFFFFFFFFu) {
        out[*k - 1].len += r.len;
        return XM_OK;
    }
    if (*k >= cap)
        return XM_ESPACE;
    out[(*k)++] = r;
    return XM_OK;
}

int xm_extents(const xm_extent *ext, size_t n, uint64_t lba, uint64_t nblocks,
               xm_extent *out, size_t cap, size_t *nout)
{
    return walk(ext, n, lba, nblocks, out, cap, nout, status_emit);
}

static int mergeable(const xm_extent *a, const xm_extent *b, uint32_t max_len)
{
    return a->pbn != XM_HOLE && b->pbn != XM_HOLE && a->lba + a->len == b->lba &&
           a->pbn + a->len == b->pbn && a->birth == b->birth && a->flags == b->flags &&
           (uint64_t)a->len + b->len <= max_len;
}

int xm_insert(const xm_extent *old, size_t n, const xm_extent *nw, uint32_t max_len,
              xm_extent *keep, size_t *nkeep, xm_extent *gone, size_t *ngone)
{
    uint64_t a = nw->lba, b = nw->lba + nw->len;
    size_t k = 0, g = 0;
    int placed = nw->pbn == XM_HOLE; /* a hole is never stored */
    if (nw->len == 0)
        return XM_ECORRUPT;
    for (size_t i = 0; i < n; i++) {
        const xm_extent *o = &old[i];
        uint64_t o_end = o->lba + o->len;
        if (o->len == 0 || (i > 0 && o->lba < old[i - 1].lba + old[i - 1].len))
            return XM_ECORRUPT;
        if (!placed && o->lba >= a) {
            keep[k++] = *nw;
            placed = 1;
        }
        if (o_end <= a || o->lba >= b) {
            keep[k++] = *o;
            continue;
        }
        if (o->lba < a) {
            xm_extent h = *o;
            h.len = (uint32_t)(a - o->lba);
            keep[k++] = h;
        }
        uint64_t s = o->lba > a ? o->lba : a;
        uint64_t t = o_end < b ? o_end : b;
        xm_extent c = {s, o->pbn + (s - o->lba), o->birth, (uint32_t)(t - s), o->flags};
        gone[g++] = c;
        if (!placed) { /* nw starts inside o: it goes right after o's head */
            keep[k++] = *nw;
            placed = 1;
        }
        if (o_end > b) {
            xm_extent tl = {b, o->pbn + (b - o->lba), o->birth, (uint32_t)(o_end - b), o->flags};
            keep[k++] = tl;
        }
    }
    if (!placed)
        keep[k++] = *nw;
    /* One merge pass: keep[] is sorted and disjoint, so merging neighbours in order suffices. */
    size_t m = 0;
    for (size_t i = 0; i < k; i++) {
        if (m > 0 && mergeable(&keep[m - 1], &keep[i], max_len))
            keep[m - 1].len += keep[i].len;
        else
            keep[m++] = keep[i];
    }
    *nkeep = m;
    *ngone = g;
    return XM_OK;
}
