/*
 * xm_store.c - the store handle: LMDB environment, pool file, I/O gate, key/value API and the
 * per-request hot path.
 *
 * Who owns LMDB: in every snapdisk process this file is the only code that opens the
 * environment (py-lmdb is not used), so the hot path can read the map without crossing back
 * into Python.  LMDB allows one open environment per process; xm_open refuses a second open of
 * the same directory with XM_EBUSY.  Between processes, the Python layer holds an exclusive
 * flock on the store so that one process writes at a time.
 *
 * Threads: the environment is opened with MDB_NOTLS, so read-only transactions are not tied to a
 * thread; the hot path takes one from a small pool, renews it, and resets it afterwards.  Write
 * transactions (xm_txn_begin(write=1)) are LMDB's: one at a time, committed on the thread that
 * began them.
 *
 * Durability: commits use MDB_NOSYNC unless XM_OPEN_SYNC_COMMITS; a committed transaction is in
 * the page cache, so it survives the death of the process.  xm_sync makes everything durable in
 * order: pool data first, then the map that points at it.
 *
 * Key and value encodings (the Python side packs the same bytes):
 *   LIVE      key vol:u32be lba:u64be                    value len:u32 flags:u32 pbn:u64 birth:u64
 *   (values little-endian, in the order of xm_lval below)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "xm.h"

#define RTXN_POOL 64
#define BATCH 256

static const char *db_names[XM_DB_COUNT] = {
    "meta", "volumes", "volstate", "names", "snaps", "live", "livebirth",
    "dead", "deadidx", "refs", "free", "pending", "counters",
};

typedef struct {
    uint32_t len;
    uint32_t flags;
    uint64_t pbn;
    uint64_t birth;
} xm_lval;

typedef struct {
    uint64_t size_bytes;
    uint64_t max_snap;
    int known;
    int writable;
} volcfg;

struct xm_store {
    MDB_env *env;
    MDB_dbi dbi[XM_DB_COUNT];
    int pool_fd;
    dev_t dev;
    ino_t ino;
    pthread_rwlock_t gate;
    pthread_mutex_t mu; /* guards rtxn[] */
    MDB_txn *rtxn[RTXN_POOL];
    int nrtxn;
    volcfg *vols; /* indexed by volume id; resized only with the gate closed */
    uint32_t nvols;
    xm_stats stats;
};

struct xm_txn {
    xm_store *st;
    MDB_txn *txn;
};

struct xm_cur {
    xm_store *st;
    MDB_cursor *cur;
};

/* Stores open in this process, to refuse a second mdb_env_open of the same environment. */
static pthread_mutex_t open_mu = PTHREAD_MUTEX_INITIALIZER;
static xm_store *open_stores[64];

#define STAT_ADD(st, field, n) __atomic_fetch_add(&(st)->stats.field, (n), __ATOMIC_RELAXED)

const char *xm_strerror(int rc)
{
    switch (rc) {
    case XM_OK: return "success";
    case XM_ENOTFOUND: return "not found";
    case XM_ESLOW: return "needs the general path";
    case XM_ENOVOL: return "no such volume in the I/O gate";
    case XM_ERANGE: return "I/O past the end of the volume";
    case XM_ECORRUPT: return "corrupt map record";
    case XM_ESPACE: return "output array too small";
    case XM_EBUSY: return "store already open in this process";
    default: return mdb_strerror(rc);
    }
}

static int map_rc(int rc)
{
    return rc == MDB_NOTFOUND ? XM_ENOTFOUND : rc;
}

/* ---- open / close ---------------------------------------------------------------------- */

int xm_open(const char *dir_path, const char *pool_path, unsigned flags, uint64_t map_bytes,
            xm_store **out)
{
    struct stat sb;
    if (stat(dir_path, &sb) != 0)
        return errno;
    pthread_mutex_lock(&open_mu);
    int slot = -1;
    for (int i = 0; i < 64; i++) {
        if (open_stores[i] && open_stores[i]->dev == sb.st_dev && open_stores[i]->ino == sb.st_ino) {
            pthread_mutex_unlock(&open_mu);
            return XM_EBUSY;
        }
        if (!open_stores[i] && slot < 0)
            slot = i;
    }
    if (slot < 0) {
        pthread_mutex_unlock(&open_mu);
        return XM_EBUSY;
    }
    xm_store *st = calloc(1, sizeof *st);
    if (!st) {
        pthread_mutex_unlock(&open_mu);
        return ENOMEM;
    }
    st->dev = sb.st_dev;
    st->ino = sb.st_ino;
    st->pool_fd = -1;
    int rc;
    MDB_txn *txn = NULL;
    if ((rc = mdb_env_create(&st->env)))
        goto fail;
    mdb_env_set_maxdbs(st->env, XM_DB_COUNT + 2);
    mdb_env_set_maxreaders(st->env, 1024);
    if ((rc = mdb_env_set_mapsize(st->env, map_bytes)))
        goto fail;
    /* MDB_WRITEMAP: a commit updates the map's pages in place in the shared mapping instead of
     * pwrite()ing each dirty page (about 11 page writes per redirected 4 KiB write: measured
     * 25k -> 40k redirected writes/s in process).  Crash semantics are unchanged: a
     * transaction only ever writes pages that no committed meta page references, so a process
     * killed mid-transaction leaves garbage only in free pages.  The price: data.mdb is
     * ftruncate()d to the map size (sparse: `du` shows what it uses), and a stray pointer in
     * this process could scribble on the map (LMDB's caveat; no Python code can reach it). */
    unsigned eflags = MDB_NOTLS | MDB_NORDAHEAD | MDB_WRITEMAP;
    if (!(flags & XM_OPEN_SYNC_COMMITS))
        eflags |= MDB_NOSYNC;
    if ((rc = mdb_env_open(st->env, dir_path, eflags, 0600)))
        goto fail;
    if ((rc = mdb_txn_begin(st->env, NULL, 0, &txn)))
        goto fail;
    for (int i = 0; i < XM_DB_COUNT; i++)
        if ((rc = mdb_dbi_open(txn, db_names[i], (flags & XM_OPEN_CREATE) ? MDB_CREATE : 0, &st->dbi[i])))
            goto fail;
    if ((rc = mdb_txn_commit(txn))) {
        txn = NULL;
        goto fail;
    }
    txn = NULL;
    st->pool_fd = open(pool_path, O_RDWR | O_CLOEXEC | ((flags & XM_OPEN_CREATE) ? O_CREAT : 0), 0600);
    if (st->pool_fd < 0) {
        rc = errno;
        goto fail;
    }
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* Writer preference, so a snapshot is not starved by a steady stream of I/O. */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&st->gate, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&st->mu, NULL);
    open_stores[slot] = st;
    pthread_mutex_unlock(&open_mu);
    *out = st;
    return XM_OK;
fail:
    if (txn)
        mdb_txn_abort(txn);
    if (st->env)
        mdb_env_close(st->env);
    free(st);
    pthread_mutex_unlock(&open_mu);
    return map_rc(rc);
}

void xm_close(xm_store *st)
{
    if (!st)
        return;
    pthread_mutex_lock(&open_mu);
    for (int i = 0; i < 64; i++)
        if (open_stores[i] == st)
            open_stores[i] = NULL;
    pthread_mutex_unlock(&open_mu);
    for (int i = 0; i < st->nrtxn; i++)
        mdb_txn_abort(st->rtxn[i]);
    mdb_env_close(st->env);
    if (st->pool_fd >= 0)
        close(st->pool_fd);
    pthread_rwlock_destroy(&st->gate);
    pthread_mutex_destroy(&st->mu);
    free(st->vols);
    free(st);
}

int xm_sync(xm_store *st)
{
    if (fdatasync(st->pool_fd) != 0)
        return errno;
    return mdb_env_sync(st->env, 1);
}

int xm_pool_fd(xm_store *st)
{
    return st->pool_fd;
}

void xm_get_stats(xm_store *st, xm_stats *out)
{
    out->records_read = __atomic_load_n(&st->stats.records_read, __ATOMIC_RELAXED);
    out->cursor_steps = __atomic_load_n(&st->stats.cursor_steps, __ATOMIC_RELAXED);
    out->fast_reads = __atomic_load_n(&st->stats.fast_reads, __ATOMIC_RELAXED);
    out->fast_writes = __atomic_load_n(&st->stats.fast_writes, __ATOMIC_RELAXED);
    out->slow_writes = __atomic_load_n(&st->stats.slow_writes, __ATOMIC_RELAXED);
    out->redirected_writes = __atomic_load_n(&st->stats.redirected_writes, __ATOMIC_RELAXED);
}

int xm_env_info(xm_store *st, uint64_t *last_txnid, uint64_t *map_pages_used, uint64_t *page_size)
{
    MDB_envinfo ei;
    MDB_stat ms;
    int rc;
    if ((rc = mdb_env_info(st->env, &ei)) || (rc = mdb_env_stat(st->env, &ms)))
        return rc;
    *last_txnid = ei.me_last_txnid;
    *map_pages_used = ei.me_last_pgno + 1;
    *page_size = ms.ms_psize;
    return XM_OK;
}

/* ---- the gate and the volume table --------------------------------------------------- */

void xm_gate_enter(xm_store *st) { pthread_rwlock_rdlock(&st->gate); }
void xm_gate_leave(xm_store *st) { pthread_rwlock_unlock(&st->gate); }
void xm_gate_close(xm_store *st) { pthread_rwlock_wrlock(&st->gate); }
void xm_gate_open(xm_store *st) { pthread_rwlock_unlock(&st->gate); }

int xm_vol_config(xm_store *st, uint32_t vol, uint64_t size_bytes, uint64_t max_snap, int writable)
{
    if (vol >= st->nvols) {
        uint32_t n = vol + 64;
        volcfg *v = realloc(st->vols, n * sizeof *v);
        if (!v)
            return ENOMEM;
        memset(v + st->nvols, 0, (n - st->nvols) * sizeof *v);
        st->vols = v;
        st->nvols = n;
    }
    st->vols[vol] = (volcfg){size_bytes, max_snap, 1, writable};
    return XM_OK;
}

int xm_vol_forget(xm_store *st, uint32_t vol)
{
    if (vol < st->nvols)
        st->vols[vol].known = 0;
    return XM_OK;
}

/* ---- key/value API ------------------------------------------------------------------- */

int xm_txn_begin(xm_store *st, int write, xm_txn **out)
{
    xm_txn *t = malloc(sizeof *t);
    if (!t)
        return ENOMEM;
    t->st = st;
    int rc = mdb_txn_begin(st->env, NULL, write ? 0 : MDB_RDONLY, &t->txn);
    if (rc) {
        free(t);
        return rc;
    }
    *out = t;
    return XM_OK;
}

int xm_txn_commit(xm_txn *t)
{
    int rc = mdb_txn_commit(t->txn);
    free(t);
    return rc;
}

void xm_txn_abort(xm_txn *t)
{
    mdb_txn_abort(t->txn);
    free(t);
}

int xm_get(xm_txn *t, int db, const void *key, size_t klen, xm_val *val)
{
    MDB_val k = {klen, (void *)key}, v;
    int rc = mdb_get(t->txn, t->st->dbi[db], &k, &v);
    if (rc)
        return map_rc(rc);
    val->data = v.mv_data;
    val->len = v.mv_size;
    return XM_OK;
}

int xm_put(xm_txn *t, int db, const void *key, size_t klen, const void *val, size_t vlen)
{
    MDB_val k = {klen, (void *)key}, v = {vlen, (void *)val};
    return mdb_put(t->txn, t->st->dbi[db], &k, &v, 0);
}

int xm_del(xm_txn *t, int db, const void *key, size_t klen)
{
    MDB_val k = {klen, (void *)key};
    return map_rc(mdb_del(t->txn, t->st->dbi[db], &k, NULL));
}

int xm_del_prefix(xm_txn *t, int db, const void *prefix, size_t plen, uint64_t *count)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(t->txn, t->st->dbi[db], &c);
    if (rc)
        return rc;
    uint64_t n = 0;
    for (;;) {
        MDB_val k = {plen, (void *)prefix}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND) {
            rc = XM_OK;
            break;
        }
        if (rc)
            break;
        if (k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0)
            break;
        if ((rc = mdb_cursor_del(c, 0)))
            break;
        n++;
    }
    mdb_cursor_close(c);
    *count = n;
    return rc;
}

int xm_cur_open(xm_txn *t, int db, xm_cur **out)
{
    xm_cur *c = malloc(sizeof *c);
    if (!c)
        return ENOMEM;
    c->st = t->st;
    int rc = mdb_cursor_open(t->txn, t->st->dbi[db], &c->cur);
    if (rc) {
        free(c);
        return rc;
    }
    *out = c;
    return XM_OK;
}

void xm_cur_close(xm_cur *c)
{
    mdb_cursor_close(c->cur);
    free(c);
}

int xm_cur_get(xm_cur *c, int op, const void *key, size_t klen, xm_val *kout, xm_val *vout)
{
    static const MDB_cursor_op ops[] = {MDB_FIRST, MDB_LAST, MDB_NEXT, MDB_PREV,
                                        MDB_SET_RANGE, MDB_SET_KEY, MDB_GET_CURRENT};
    if (op < 0 || op > XM_GET_CURRENT)
        return EINVAL;
    MDB_val k = {klen, (void *)key}, v = {0, NULL};
    STAT_ADD(c->st, cursor_steps, 1);
    int rc = mdb_cursor_get(c->cur, &k, &v, ops[op]);
    if (rc)
        return map_rc(rc);
    kout->data = k.mv_data;
    kout->len = k.mv_size;
    vout->data = v.mv_data;
    vout->len = v.mv_size;
    return XM_OK;
}

int xm_cur_del(xm_cur *c)
{
    return mdb_cursor_del(c->cur, 0);
}

/* ---- live-map scans ------------------------------------------------------------------ */

static void live_key(uint8_t k[12], uint32_t vol, uint64_t lba)
{
    for (int i = 0; i < 4; i++)
        k[i] = (uint8_t)(vol >> (24 - 8 * i));
    for (int i = 0; i < 8; i++)
        k[4 + i] = (uint8_t)(lba >> (56 - 8 * i));
}

static int decode_live(const MDB_val *k, const MDB_val *v, uint32_t vol, xm_extent *e, int *mine)
{
    if (k->mv_size != 12)
        return XM_ECORRUPT;
    const uint8_t *p = k->mv_data;
    uint32_t kv = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    *mine = kv == vol;
    if (!*mine)
        return XM_OK;
    if (v->mv_size != sizeof(xm_lval))
        return XM_ECORRUPT;
    xm_lval lv;
    memcpy(&lv, v->mv_data, sizeof lv);
    uint64_t lba = 0;
    for (int i = 0; i < 8; i++)
        lba = (lba << 8) | p[4 + i];
    if (lv.len == 0 || lv.len > XM_MAX_EXTENT)
        return XM_ECORRUPT;
    *e = (xm_extent){lba, lv.pbn, lv.birth, lv.len, lv.flags};
    return XM_OK;
}

/* Records of vol overlapping [lo, hi), in order, at most cap; *more is set when the cap cut the
 * list short (the caller then continues from the end of the last record). */
static int scan_live(xm_store *st, MDB_cursor *c, uint32_t vol, uint64_t lo, uint64_t hi,
                     xm_extent *out, size_t cap, size_t *nout, int *more)
{
    uint8_t kb[12];
    live_key(kb, vol, lo);
    MDB_val k = {12, kb}, v;
    size_t n = 0;
    int mine, rc;
    *more = 0;
    STAT_ADD(st, cursor_steps, 1);
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    int at_end = rc == MDB_NOTFOUND;
    if (rc && !at_end)
        return rc;
    /* The record before the first one at or after lo may reach into the range. */
    xm_extent e;
    int first_is_lo = 0;
    if (!at_end) {
        if ((rc = decode_live(&k, &v, vol, &e, &mine)))
            return rc;
        first_is_lo = mine && e.lba == lo;
    }
    if (!first_is_lo) {
        MDB_val pk, pv;
        STAT_ADD(st, cursor_steps, 1);
        rc = mdb_cursor_get(c, &pk, &pv, at_end ? MDB_LAST : MDB_PREV);
        if (rc == XM_OK) {
            if ((rc = decode_live(&pk, &pv, vol, &e, &mine)))
                return rc;
            STAT_ADD(st, records_read, 1);
            if (mine && e.lba + e.len > lo && e.lba < hi) {
                out[n++] = e;
            }
        } else if (rc != MDB_NOTFOUND) {
            return rc;
        }
        if (at_end) {
            *nout = n;
            return XM_OK;
        }
        /* Back to the first record at or after lo. */
        STAT_ADD(st, cursor_steps, 1);
        if (rc == XM_OK)
            rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        else
            rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
        if (rc)
            return rc == MDB_NOTFOUND ? XM_OK : rc;
    }
    for (;;) {
        if ((rc = decode_live(&k, &v, vol, &e, &mine)))
            return rc;
        if (!mine || e.lba >= hi)
            break;
        STAT_ADD(st, records_read, 1);
        if (n >= cap) {
            *more = 1;
            break;
        }
        out[n++] = e;
        STAT_ADD(st, cursor_steps, 1);
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        if (rc == MDB_NOTFOUND)
            break;
        if (rc)
            return rc;
    }
    *nout = n;
    return XM_OK;
}

int xm_live_overlap(xm_txn *t, uint32_t vol, uint64_t lba, uint64_t nblocks,
                    xm_extent *out, size_t cap, size_t *nout)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(t->txn, t->st->dbi[XM_DB_LIVE], &c);
    if (rc)
        return rc;
    int more;
    uint64_t lo = lba > 0 ? lba - 1 : 0;
    rc = scan_live(t->st, c, vol, lo, lba + nblocks + 1, out, cap, nout, &more);
    mdb_cursor_close(c);
    if (rc == XM_OK && more)
        rc = XM_ESPACE;
    return rc;
}

/* ---- the hot path -------------------------------------------------------------------- */

static int rtxn_get(xm_store *st, MDB_txn **out)
{
    MDB_txn *t = NULL;
    pthread_mutex_lock(&st->mu);
    if (st->nrtxn > 0)
        t = st->rtxn[--st->nrtxn];
    pthread_mutex_unlock(&st->mu);
    if (t) {
        int rc = mdb_txn_renew(t);
        if (rc == XM_OK) {
            *out = t;
            return XM_OK;
        }
        mdb_txn_abort(t);
    }
    return mdb_txn_begin(st->env, NULL, MDB_RDONLY, out);
}

static void rtxn_put(xm_store *st, MDB_txn *t)
{
    mdb_txn_reset(t);
    pthread_mutex_lock(&st->mu);
    if (st->nrtxn < RTXN_POOL) {
        st->rtxn[st->nrtxn++] = t;
        t = NULL;
    }
    pthread_mutex_unlock(&st->mu);
    if (t)
        mdb_txn_abort(t);
}

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

static int pread_full(int fd, uint8_t *buf, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t r = pread(fd, buf, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0) { /* past the end of a sparse pool file: never written, reads as zeros */
            memset(buf, 0, n);
            return XM_OK;
        }
        buf += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return XM_OK;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t r = pwrite(fd, buf, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        buf += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return XM_OK;
}

/* For each run of plan[], the bytes of [offset, offset+length) it covers. */
static int apply_plan(int fd, const xm_extent *plan, size_t np, uint64_t offset, uint64_t length,
                      uint8_t *buf, const uint8_t *wbuf)
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
                return XM_ESLOW; /* cannot happen: the caller checked coverage */
            memset(buf + (s - offset), 0, e - s);
            continue;
        }
        uint64_t foff = plan[i].pbn * XM_BLOCK_SIZE + (s - rs);
        rc = wbuf ? pwrite_full(fd, wbuf + (s - offset), e - s, foff)
                  : pread_full(fd, buf + (s - offset), e - s, foff);
        if (rc)
            return rc;
    }
    return XM_OK;
}

int xm_read(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, uint8_t *buf)
{
    xm_extent recs[BATCH], plan[2 * BATCH + 2];
    MDB_txn *txn = NULL;
    MDB_cursor *c = NULL;
    int rc;
    xm_gate_enter(st);
    if ((rc = check_range(st, vol, offset, length, 0)))
        goto out;
    if (length == 0)
        goto out;
    if ((rc = rtxn_get(st, &txn)))
        goto out;
    if ((rc = mdb_cursor_open(txn, st->dbi[XM_DB_LIVE], &c)))
        goto out;
    uint64_t pos = offset / XM_BLOCK_SIZE;
    uint64_t end = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    while (pos < end) {
        size_t n, np;
        int more;
        if ((rc = scan_live(st, c, vol, pos, end, recs, BATCH, &n, &more)))
            goto out;
        uint64_t upto = more ? recs[n - 1].lba + recs[n - 1].len : end;
        if (upto > end)
            upto = end;
        if ((rc = xm_plan(recs, n, pos, upto - pos, plan, 2 * BATCH + 2, &np)))
            goto out;
        if ((rc = apply_plan(st->pool_fd, plan, np, offset, length, buf, NULL)))
            goto out;
        pos = upto;
    }
    STAT_ADD(st, fast_reads, 1);
out:
    if (c)
        mdb_cursor_close(c);
    if (txn)
        rtxn_put(st, txn);
    xm_gate_leave(st);
    return rc;
}

int xm_write_fast(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf)
{
    xm_extent recs[BATCH], plan[2 * BATCH + 2];
    MDB_txn *txn = NULL;
    MDB_cursor *c = NULL;
    int rc;
    xm_gate_enter(st);
    if ((rc = check_range(st, vol, offset, length, 1)))
        goto out;
    if (length == 0)
        goto out;
    if ((rc = rtxn_get(st, &txn)))
        goto out;
    if ((rc = mdb_cursor_open(txn, st->dbi[XM_DB_LIVE], &c)))
        goto out;
    uint64_t lo = offset / XM_BLOCK_SIZE;
    uint64_t hi = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    size_t n, np;
    int more;
    if ((rc = scan_live(st, c, vol, lo, hi, recs, BATCH, &n, &more)))
        goto out;
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
    if (rc == XM_OK && (rc = xm_plan(recs, n, lo, hi - lo, plan, 2 * BATCH + 2, &np)) == XM_OK)
        rc = apply_plan(st->pool_fd, plan, np, offset, length, NULL, buf);
    if (rc == XM_OK)
        STAT_ADD(st, fast_writes, 1);
    else if (rc == XM_ESLOW)
        STAT_ADD(st, slow_writes, 1);
out:
    if (c)
        mdb_cursor_close(c);
    if (txn)
        rtxn_put(st, txn);
    xm_gate_leave(st);
    return rc;
}

int xm_block_status(xm_store *st, uint32_t vol, uint64_t lba, uint64_t nblocks,
                    xm_extent *out, size_t cap, size_t *nout)
{
    xm_extent recs[BATCH], runs[2 * BATCH + 2];
    MDB_txn *txn = NULL;
    MDB_cursor *c = NULL;
    size_t k = 0;
    int rc;
    xm_gate_enter(st);
    if ((rc = check_range(st, vol, lba * XM_BLOCK_SIZE, nblocks * XM_BLOCK_SIZE, 0)))
        goto out;
    if ((rc = rtxn_get(st, &txn)))
        goto out;
    if ((rc = mdb_cursor_open(txn, st->dbi[XM_DB_LIVE], &c)))
        goto out;
    uint64_t pos = lba, end = lba + nblocks;
    while (pos < end && k < cap) {
        size_t n, nr;
        int more;
        if ((rc = scan_live(st, c, vol, pos, end, recs, BATCH, &n, &more)))
            goto out;
        uint64_t upto = more ? recs[n - 1].lba + recs[n - 1].len : end;
        if (upto > end)
            upto = end;
        if ((rc = xm_extents(recs, n, pos, upto - pos, runs, 2 * BATCH + 2, &nr)))
            goto out;
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
out:
    *nout = k;
    if (c)
        mdb_cursor_close(c);
    if (txn)
        rtxn_put(st, txn);
    xm_gate_leave(st);
    return rc;
}

/* ---- the redirect-on-write path -------------------------------------------------------
 *
 * xm_write is the C twin of the common case of Engine._write_locked (volume.py) together with
 * extmap.overlay/kill and allocator.allocate: the records it touches are never SHARED, so no
 * block changes its holder count, and every record it covers is held by a snapshot (or it would
 * have been written in place), so covered parts always become dead records: nothing is freed.
 * Layouts: see extmap.py. */

typedef struct {
    uint64_t size_bytes, epoch, max_snap, live_blocks;
    uint32_t nsnaps, flags;
} volstate;

static void be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static int kv_get(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, MDB_val *v)
{
    MDB_val key = {kl, (void *)k};
    return mdb_get(t, d, &key, v);
}

static int kv_put(MDB_txn *t, MDB_dbi d, const void *k, size_t kl, const void *v, size_t vl)
{
    MDB_val key = {kl, (void *)k}, val = {vl, (void *)v};
    return mdb_put(t, d, &key, &val, 0);
}

static int kv_del(MDB_txn *t, MDB_dbi d, const void *k, size_t kl)
{
    MDB_val key = {kl, (void *)k};
    int rc = mdb_del(t, d, &key, NULL);
    return rc == MDB_NOTFOUND ? XM_OK : rc;
}

static int live_put(xm_store *st, MDB_txn *t, uint32_t vol, volstate *vs, const xm_extent *e)
{
    uint8_t k[20];
    xm_lval lv = {e->len, e->flags, e->pbn, e->birth};
    live_key(k, vol, e->lba);
    int rc = kv_put(t, st->dbi[XM_DB_LIVE], k, 12, &lv, sizeof lv);
    if (rc || vs->nsnaps == 0)
        return rc;
    be32(k, vol);
    be64(k + 4, e->birth);
    be64(k + 12, e->lba);
    vs->flags |= XM_VS_BIRTH_INDEXED;
    return kv_put(t, st->dbi[XM_DB_LIVEBIRTH], k, 20, &e->len, 4);
}

static int live_del(xm_store *st, MDB_txn *t, uint32_t vol, const volstate *vs, const xm_extent *e)
{
    uint8_t k[20];
    live_key(k, vol, e->lba);
    int rc = kv_del(t, st->dbi[XM_DB_LIVE], k, 12);
    if (rc || !(vs->flags & XM_VS_BIRTH_INDEXED))
        return rc;
    be32(k, vol);
    be64(k + 4, e->birth);
    be64(k + 12, e->lba);
    return kv_del(t, st->dbi[XM_DB_LIVEBIRTH], k, 20);
}

/* The covered part of a record a snapshot holds: a dead record, its DEADIDX entry, COUNTERS. */
static int add_dead(xm_store *st, MDB_txn *t, uint32_t vol, const xm_extent *e, uint64_t death)
{
    uint8_t k[28];
    xm_lval dv = {e->len, e->flags, e->pbn, death};
    int rc;
    be32(k, vol);
    be64(k + 4, e->lba);
    be64(k + 12, e->birth);
    if ((rc = kv_put(t, st->dbi[XM_DB_DEAD], k, 20, &dv, sizeof dv)))
        return rc;
    be64(k + 4, death);
    be64(k + 12, e->birth);
    be64(k + 20, e->lba);
    if ((rc = kv_put(t, st->dbi[XM_DB_DEADIDX], k, 28, &e->len, 4)))
        return rc;
    MDB_val v;
    uint64_t n = 0;
    rc = kv_get(t, st->dbi[XM_DB_COUNTERS], k, 20, &v); /* vol, death, birth */
    if (rc == XM_OK && v.mv_size == 8)
        memcpy(&n, v.mv_data, 8);
    else if (rc != MDB_NOTFOUND && rc != XM_OK)
        return rc;
    n += e->len;
    return kv_put(t, st->dbi[XM_DB_COUNTERS], k, 20, &n, 8);
}

/* Twin of allocator.allocate: free runs from the next-fit hint on, then from the start, then
 * fresh space at the high-water mark.  Runs go to out[] (cap entries). */
static int allocate(xm_store *st, MDB_txn *t, uint64_t need, xm_extent *out, size_t cap, size_t *nout)
{
    MDB_val v;
    uint64_t alloc[2] = {0, 0}, pool_blocks = 0, totals[2] = {0, 0}, taken = 0;
    int rc = kv_get(t, st->dbi[XM_DB_META], "alloc", 5, &v);
    if (rc == XM_OK && v.mv_size == 16)
        memcpy(alloc, v.mv_data, 16);
    else if (rc != MDB_NOTFOUND)
        return rc ? rc : XM_ECORRUPT;
    uint64_t hwm = alloc[0], hint = alloc[1];
    size_t n = 0;
    MDB_cursor *c;
    if ((rc = mdb_cursor_open(t, st->dbi[XM_DB_FREE], &c)))
        return rc;
    for (int pass = 0; pass < 2 && need > 0; pass++) {
        uint64_t start = pass == 0 ? hint : 0;
        uint8_t kb[8];
        be64(kb, start);
        MDB_val k = {8, kb}, fv;
        rc = mdb_cursor_get(c, &k, &fv, MDB_SET_RANGE);
        while (rc == XM_OK && need > 0) {
            if (k.mv_size != 8 || fv.mv_size != 8) {
                rc = XM_ECORRUPT;
                break;
            }
            uint64_t pbn = get_be64(k.mv_data), len;
            memcpy(&len, fv.mv_data, 8);
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
                uint8_t nk[8];
                uint64_t rest = len - take;
                be64(nk, pbn + take);
                if ((rc = kv_put(t, st->dbi[XM_DB_FREE], nk, 8, &rest, 8)))
                    break;
            }
            out[n++] = (xm_extent){0, pbn, 0, (uint32_t)take, 0};
            need -= take;
            taken += take;
            hint = pbn + take;
            be64(kb, pbn + take);
            k = (MDB_val){8, kb};
            rc = mdb_cursor_get(c, &k, &fv, MDB_SET_RANGE);
        }
        if (rc == MDB_NOTFOUND)
            rc = XM_OK;
        if (rc)
            break;
    }
    mdb_cursor_close(c);
    if (rc)
        return rc;
    if (need) {
        if ((rc = kv_get(t, st->dbi[XM_DB_META], "pool_blocks", 11, &v)))
            return rc == MDB_NOTFOUND ? XM_ECORRUPT : rc;
        memcpy(&pool_blocks, v.mv_data, 8);
        if (hwm + need > pool_blocks)
            return ENOSPC;
        if (n >= cap)
            return XM_ESLOW;
        out[n++] = (xm_extent){0, hwm, 0, (uint32_t)need, 0};
        hwm += need;
        hint = hwm;
    }
    alloc[0] = hwm;
    alloc[1] = hint;
    if ((rc = kv_put(t, st->dbi[XM_DB_META], "alloc", 5, alloc, 16)))
        return rc;
    if (taken) {
        rc = kv_get(t, st->dbi[XM_DB_META], "blocks", 6, &v);
        if (rc == XM_OK && v.mv_size == 16)
            memcpy(totals, v.mv_data, 16);
        else if (rc != MDB_NOTFOUND)
            return rc ? rc : XM_ECORRUPT;
        totals[0] -= taken;
        if ((rc = kv_put(t, st->dbi[XM_DB_META], "blocks", 6, totals, 16)))
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
static int overlay(xm_store *st, MDB_txn *t, MDB_cursor *c, uint32_t vol, volstate *vs,
                   const xm_extent *nw)
{
    xm_extent old[BATCH], keep[BATCH + 2], gone[BATCH];
    size_t n, nk, ng;
    int more, rc;
    uint64_t lo = nw->lba > 0 ? nw->lba - 1 : 0;
    if ((rc = scan_live(st, c, vol, lo, nw->lba + nw->len + 1, old, BATCH, &n, &more)))
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
            return XM_ECORRUPT; /* cannot happen: such parts were written in place */
        if ((rc = add_dead(st, t, vol, &gone[i], vs->epoch)))
            return rc;
        vs->live_blocks -= gone[i].len;
    }
    vs->live_blocks += nw->len;
    return XM_OK;
}

/* Full-block content of blocks [a, b) for a write of [offset, offset+length): the new data,
 * and the old content of partly written first and last blocks (read-modify-write). */
static int fill_blocks(xm_store *st, const xm_extent *recs, size_t n, uint64_t a, uint64_t b,
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
                int rc = pread_full(st->pool_fd, out + (blk - a) * XM_BLOCK_SIZE, XM_BLOCK_SIZE,
                                    (recs[j].pbn + blk - recs[j].lba) * XM_BLOCK_SIZE);
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

static int redirect_run(xm_store *st, MDB_txn *t, MDB_cursor *c, uint32_t vol, volstate *vs,
                        const xm_extent *recs, size_t n, uint64_t a, uint64_t b,
                        uint64_t offset, uint64_t length, const uint8_t *buf)
{
    xm_extent runs[16];
    size_t nruns;
    int rc;
    uint8_t *data = malloc((b - a) * XM_BLOCK_SIZE);
    if (!data)
        return ENOMEM;
    if ((rc = fill_blocks(st, recs, n, a, b, offset, length, buf, data)))
        goto out;
    if ((rc = allocate(st, t, b - a, runs, 16, &nruns)))
        goto out;
    uint64_t pos = 0;
    for (size_t r = 0; r < nruns && rc == XM_OK; r++) {
        if ((rc = pwrite_full(st->pool_fd, data + pos * XM_BLOCK_SIZE,
                              (uint64_t)runs[r].len * XM_BLOCK_SIZE, runs[r].pbn * XM_BLOCK_SIZE)))
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

int xm_write(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf)
{
    xm_extent recs[BATCH];
    MDB_txn *t = NULL;
    MDB_cursor *c = NULL;
    volstate vs;
    uint8_t vk[4];
    MDB_val v;
    size_t n;
    int more, rc, redirected = 0;
    xm_gate_enter(st);
    if ((rc = check_range(st, vol, offset, length, 1)) || length == 0)
        goto out;
    if ((rc = mdb_txn_begin(st->env, NULL, 0, &t)))
        goto out;
    be32(vk, vol);
    if ((rc = kv_get(t, st->dbi[XM_DB_VOLSTATE], vk, 4, &v)))
        goto out;
    if (v.mv_size != sizeof vs) {
        rc = XM_ECORRUPT;
        goto out;
    }
    memcpy(&vs, v.mv_data, sizeof vs);
    if (offset + length > vs.size_bytes) {
        rc = XM_ERANGE;
        goto out;
    }
    if ((rc = mdb_cursor_open(t, st->dbi[XM_DB_LIVE], &c)))
        goto out;
    uint64_t lo = offset / XM_BLOCK_SIZE, hi = (offset + length + XM_BLOCK_SIZE - 1) / XM_BLOCK_SIZE;
    if ((rc = scan_live(st, c, vol, lo, hi, recs, BATCH, &n, &more)))
        goto out;
    if (more) {
        rc = XM_ESLOW;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if (recs[i].flags & XM_F_SHARED) {
            rc = XM_ESLOW;
            goto out;
        }
    /* Walk [lo, hi) by record: write in place what may be, collect runs to redirect. */
    uint64_t pos = lo, run_a = 0, run_b = 0, end = offset + length;
    int in_run = 0;
    size_t i = 0;
    while (pos < hi) {
        while (i < n && recs[i].lba + recs[i].len <= pos)
            i++;
        uint64_t seg_end;
        int eligible = 0;
        if (i < n && recs[i].lba <= pos) {
            seg_end = recs[i].lba + recs[i].len < hi ? recs[i].lba + recs[i].len : hi;
            eligible = recs[i].birth > vs.max_snap;
        } else {
            seg_end = i < n && recs[i].lba < hi ? recs[i].lba : hi;
        }
        if (eligible) {
            uint64_t s = pos * XM_BLOCK_SIZE > offset ? pos * XM_BLOCK_SIZE : offset;
            uint64_t x = seg_end * XM_BLOCK_SIZE < end ? seg_end * XM_BLOCK_SIZE : end;
            if ((rc = pwrite_full(st->pool_fd, buf + (s - offset), x - s,
                                  (recs[i].pbn + pos - recs[i].lba) * XM_BLOCK_SIZE + s % XM_BLOCK_SIZE)))
                goto out;
            if (in_run) {
                if ((rc = redirect_run(st, t, c, vol, &vs, recs, n, run_a, run_b, offset, length, buf)))
                    goto out;
                redirected = 1;
                in_run = 0;
            }
        } else if (in_run && run_b == pos) {
            run_b = seg_end;
        } else {
            run_a = pos;
            run_b = seg_end;
            in_run = 1;
        }
        pos = seg_end;
    }
    if (in_run) {
        if ((rc = redirect_run(st, t, c, vol, &vs, recs, n, run_a, run_b, offset, length, buf)))
            goto out;
        redirected = 1;
    }
    if (redirected) {
        if ((rc = kv_put(t, st->dbi[XM_DB_VOLSTATE], vk, 4, &vs, sizeof vs)))
            goto out;
        mdb_cursor_close(c);
        c = NULL;
        rc = mdb_txn_commit(t);
        t = NULL;
        if (rc == XM_OK)
            STAT_ADD(st, redirected_writes, 1);
    }
out:
    if (c)
        mdb_cursor_close(c);
    if (t)
        mdb_txn_abort(t);
    xm_gate_leave(st);
    return rc;
}
