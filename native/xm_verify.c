/*
 * xm_verify.c - a structural check of LMDB's B-trees, before anything walks them.
 *
 * Why: LMDB trusts its pages.  A damaged page (64 random bytes in data.mdb) can make
 * mdb_cursor_get follow a node flag or an offset into unmapped memory, and the process dies of
 * SIGSEGV inside liblmdb before any check of ours sees a value (issue 10, item 7).  So `check`
 * and the server's start call xm_verify first: it walks every page reachable from the current
 * meta page, in the mapped file, and checks what LMDB's cursor code relies on: page numbers in
 * the file, page headers and node offsets inside the page, node sizes, overflow chains, the
 * sub-database records of the main DB, tree depths, and that no page is reached twice.  Reading
 * only checked bytes, it cannot crash; it does not check key order (a misordered tree makes
 * LMDB answer wrongly, which `check` finds, but not crash).
 *
 * This reads LMDB 0.9's on-disk format (lmdb/mdb.c: MDB_page, MDB_node, MDB_meta, MDB_db) on a
 * little-endian 64-bit host; liblmdb 0.9.x has kept it since 0.9.0.  A different LMDB (1.0
 * changes the format) needs this file changed: xm_verify then refuses every store.
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* mdb.c's layout (64-bit pgno_t and size_t). */
#define PAGEHDRSZ 16
#define P_BRANCH 0x01
#define P_LEAF 0x02
#define P_OVERFLOW 0x04
#define P_IGNORED 0xC010 /* P_DIRTY, P_LOOSE, P_KEEP: in-memory bookkeeping bits */
#define NODESIZE 8
#define F_BIGDATA 0x01
#define F_SUBDATA 0x02
#define DB_SIZE 48        /* MDB_db */
#define META_DBS 40       /* offsets in a meta page (page 0 or 1): mm_dbs[2] after the header */
#define META_LAST_PG 136
#define META_TXNID 144
#define P_INVALID UINT64_MAX
#define MAX_DEPTH 32
#define MAX_KEY 511

typedef struct {
    const uint8_t *map;
    uint64_t psize, last_pg;
    uint8_t *seen; /* a bit per page */
    uint64_t bad;  /* the page found damaged */
} walk;

static uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t u32(const uint8_t *p) { return xm_get_le32(p); }
static uint64_t u64(const uint8_t *p) { return xm_get_le64(p); }

static int bad(walk *w, uint64_t pgno)
{
    w->bad = pgno;
    return XM_ECORRUPT;
}

/* Page pgno (and n-1 more, for an overflow run) is in the file and seen for the first time. */
static const uint8_t *page(walk *w, uint64_t pgno, uint64_t n)
{
    if (pgno < 2 || pgno > w->last_pg || n == 0 || n > w->last_pg - pgno + 1)
        return NULL;
    for (uint64_t i = pgno; i < pgno + n; i++) {
        if (w->seen[i / 8] & (1u << (i % 8)))
            return NULL;
        w->seen[i / 8] |= (uint8_t)(1u << (i % 8));
    }
    const uint8_t *p = w->map + pgno * w->psize;
    return u64(p) == pgno ? p : NULL;
}

static int check_tree(walk *w, uint64_t root, unsigned depth, int main_db);

/* A MAIN-DB record of a named database: an MDB_db with no flags we do not use. */
static int check_subdb(walk *w, const uint8_t *db, uint64_t pgno)
{
    uint16_t flags = u16(db + 4), depth = u16(db + 6);
    uint64_t root = u64(db + 40);
    if (flags != 0 || depth > MAX_DEPTH)
        return bad(w, pgno);
    if (root == P_INVALID)
        return depth == 0 ? XM_OK : bad(w, pgno);
    return check_tree(w, root, depth, 0);
}

/* Leaf node data of dsize bytes at d: inline, or an overflow run. */
static int check_data(walk *w, const uint8_t *p, uint64_t pgno, uint64_t off, uint16_t flags,
                      uint64_t dsize, int main_db, int free_db)
{
    const uint8_t *d = p + off;
    if (flags & F_BIGDATA) {
        if (off + 8 > w->psize)
            return bad(w, pgno);
        uint64_t ov = u64(d);
        if (ov < 2 || ov > w->last_pg)
            return bad(w, pgno);
        const uint8_t *op = w->map + ov * w->psize;
        uint32_t n = u32(op + 12);
        if (!(u16(op + 10) & P_OVERFLOW) || !page(w, ov, n) || dsize > (uint64_t)n * w->psize - PAGEHDRSZ)
            return bad(w, ov);
        d = op + PAGEHDRSZ;
    } else if (off + dsize > w->psize) {
        return bad(w, pgno);
    }
    if (free_db && (dsize < 8 || u64(d) > (dsize - 8) / 8)) /* an IDL: count, then pgnos */
        return bad(w, pgno);
    if (flags & F_SUBDATA)
        return main_db && dsize == DB_SIZE && !(flags & F_BIGDATA) ? check_subdb(w, d, pgno)
                                                                 : bad(w, pgno);
    return XM_OK;
}

static int check_page(walk *w, uint64_t pgno, unsigned level, unsigned depth, int main_db, int free_db)
{
    const uint8_t *p = page(w, pgno, 1);
    if (!p)
        return bad(w, pgno);
    uint16_t pflags = u16(p + 10) & (uint16_t)~P_IGNORED, lower = u16(p + 12), upper = u16(p + 14);
    int leaf = pflags == P_LEAF, branch = pflags == P_BRANCH;
    if (!(leaf || branch) || leaf != (level == depth) || lower < PAGEHDRSZ || lower > upper ||
        upper > w->psize || (lower - PAGEHDRSZ) % 2)
        return bad(w, pgno);
    unsigned nkeys = (lower - PAGEHDRSZ) / 2;
    if (branch && nkeys == 0)
        return bad(w, pgno);
    for (unsigned i = 0; i < nkeys; i++) {
        uint64_t off = u16(p + PAGEHDRSZ + 2 * i);
        if (off < upper || off + NODESIZE > w->psize)
            return bad(w, pgno);
        const uint8_t *n = p + off;
        uint16_t lo = u16(n), hi = u16(n + 2), nflags = u16(n + 4), ksize = u16(n + 6);
        if (ksize > MAX_KEY || off + NODESIZE + ksize > w->psize)
            return bad(w, pgno);
        int rc;
        if (branch) {
            uint64_t child = lo | ((uint64_t)hi << 16) | ((uint64_t)nflags << 32);
            rc = check_page(w, child, level + 1, depth, main_db, free_db);
        } else {
            if (nflags & ~(F_BIGDATA | F_SUBDATA))
                return bad(w, pgno);
            rc = check_data(w, p, pgno, off + NODESIZE + ksize, nflags, lo | ((uint64_t)hi << 16),
                            main_db, free_db);
        }
        if (rc)
            return rc;
    }
    return XM_OK;
}

static int check_tree(walk *w, uint64_t root, unsigned depth, int main_db)
{
    if (depth == 0 || depth > MAX_DEPTH)
        return bad(w, root);
    return check_page(w, root, 1, depth, main_db, 0);
}

int xm_verify(xm_store *st, uint64_t *bad_pgno)
{
    MDB_txn *txn;
    MDB_stat ms;
    walk w = {st->map_addr, 0, 0, NULL, 0};
    *bad_pgno = 0;
    /* A read transaction pins the snapshot: no page reachable from its meta is reused while
     * it lives. */
    int rc = mdb_txn_begin(st->env, NULL, MDB_RDONLY, &txn);
    if (rc)
        return xm_rc(rc);
    if ((rc = mdb_env_stat(st->env, &ms)))
        goto out;
    w.psize = ms.ms_psize;
    uint64_t txnid = mdb_txn_id(txn);
    const uint8_t *meta = NULL;
    for (int i = 0; i < 2; i++)
        if (u64(w.map + i * w.psize + META_TXNID) == txnid)
            meta = w.map + i * w.psize;
    if (!meta) {
        rc = XM_ECORRUPT;
        goto out;
    }
    w.last_pg = u64(meta + META_LAST_PG);
    if (w.last_pg < 1 || w.last_pg >= st->map_size / w.psize) {
        rc = XM_ECORRUPT;
        goto out;
    }
    if (!(w.seen = calloc(w.last_pg / 8 + 1, 1))) {
        rc = ENOMEM;
        goto out;
    }
    for (int dbi = 0; dbi < 2 && rc == XM_OK; dbi++) { /* FREE_DBI, MAIN_DBI */
        const uint8_t *db = meta + META_DBS + dbi * DB_SIZE;
        uint16_t depth = u16(db + 6);
        uint64_t root = u64(db + 40);
        if (root == P_INVALID)
            continue;
        rc = depth == 0 || depth > MAX_DEPTH ? bad(&w, root)
                                             : check_page(&w, root, 1, depth, dbi == 1, dbi == 0);
    }
    *bad_pgno = w.bad;
out:
    free(w.seen);
    mdb_txn_abort(txn);
    return xm_rc(rc);
}
