/*
 * xm_env.c - the store handle: the LMDB environment and the pool file, open/close/sync, the I/O
 * gate, the hot path's volume table and read-transaction pool, work counters.
 *
 * Who owns LMDB: in every snapdisk process the C core is the only code that opens the
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
 * Durability: the environment is opened with MDB_NOMETASYNC (unless XM_OPEN_UNSAFE_NOSYNC):
 * each commit msync()s the map (the transaction's pages, and the previous commit's meta page)
 * before it writes its own meta page, unsynced.  LMDB (lmdb.h, MDB_NOMETASYNC): "preserves the
 * ACI ... but not D": a system crash may undo the last commit, never damage the environment.
 * D comes from xm_env_sync (mdb_env_sync(env, 1)) at every point that promises durability:
 * xm_sync (FLUSH, FUA, close), xm_txn_commit (every Python write transaction, unless
 * deferred), the end of a bulk operation, before punching what a bulk chunk freed.  Redirected
 * writes are group-committed (xm_batch.c), the pool fdatasync()ed before each batch.  xm_sync
 * makes everything durable in order: pool data first, then the map.  docs/design.md,
 * "Durability", has the whole argument.
 */
#include "xm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define MAX_OPEN 64

static const char *const db_names[] = XM_DB_NAMES_INIT;
_Static_assert(sizeof db_names / sizeof db_names[0] == XM_DB_COUNT,
               "XM_DB_NAMES_INIT needs one name per XM_DB_* number");

/* Stores open in this process, to refuse a second mdb_env_open of the same environment. */
static pthread_mutex_t open_mu = PTHREAD_MUTEX_INITIALIZER;
static xm_store *open_stores[MAX_OPEN];

const char *xm_db_name(int db)
{
    return db >= 0 && db < XM_DB_COUNT ? db_names[db] : NULL;
}

const char *xm_strerror(int rc)
{
    switch (rc) {
    case XM_OK: return "success";
    case XM_ENOTFOUND: return "not found";
    case XM_ESLOW: return "needs the general path";
    case XM_ENOVOL: return "no such volume in the I/O gate";
    case XM_ERANGE: return "I/O past the end of the volume";
    case XM_ECORRUPT: return "corrupt metadata";
    case XM_ESPACE: return "output array too small";
    case XM_EBUSY: return "store already open in this process";
    case XM_EMAPFULL: return "metadata map full";
    case XM_ELOCKED: return "volume is encrypted and locked";
    default: return rc > 0 ? strerror(rc) : mdb_strerror(rc);
    }
}

/* Where LMDB mapped data.mdb.  mdb_env_info's me_mapaddr is only set for MDB_FIXEDMAP, so the
 * mapping is found in /proc/self/maps by the file's device and inode (Linux). */
static int refresh_map(xm_store *st)
{
    MDB_envinfo ei;
    struct stat sb;
    int fd, rc = mdb_env_info(st->env, &ei);
    if (rc || (rc = mdb_env_get_fd(st->env, &fd)))
        return rc;
    if (fstat(fd, &sb) != 0)
        return errno;
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f)
        return errno;
    char line[512];
    unsigned long lo, off, ino, maj, min;
    rc = ENOENT;
    /* LMDB maps the whole file with one mmap: its range starts at the mapping of offset 0 (the
     * kernel may list it in pieces). */
    while (rc && fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%*x %*s %lx %lx:%lx %lu", &lo, &off, &maj, &min, &ino) == 5 &&
            ino == sb.st_ino && makedev(maj, min) == sb.st_dev && off == 0) {
            st->map_addr = (const uint8_t *)lo;
            st->map_size = ei.me_mapsize;
            rc = XM_OK;
        }
    }
    fclose(f);
    return rc;
}

/* The databases of XM_DB_NAMES_INIT.  Opening an existing store, META must be there (it marks a
 * store); a database a newer build added is created empty, for the format upgrade to fill. */
static int open_dbs(xm_store *st, unsigned flags)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(st->env, NULL, 0, &txn);
    if (rc)
        return rc;
    for (int i = 0; i < XM_DB_COUNT && rc == XM_OK; i++) {
        unsigned f = (flags & XM_OPEN_CREATE) || i != XM_DB_META ? MDB_CREATE : 0;
        rc = mdb_dbi_open(txn, db_names[i], f, &st->dbi[i]);
    }
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    return mdb_txn_commit(txn);
}

int xm_open(const char *dir_path, const char *pool_path, unsigned flags, uint64_t map_bytes,
            xm_store **out)
{
    struct stat sb;
    if (stat(dir_path, &sb) != 0)
        return errno;
    pthread_mutex_lock(&open_mu);
    int slot = -1;
    for (int i = 0; i < MAX_OPEN; i++) {
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
    if ((rc = mdb_env_create(&st->env)))
        goto fail;
    mdb_env_set_maxdbs(st->env, XM_DB_MAX);
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
    if (flags & XM_OPEN_UNSAFE_NOSYNC)
        eflags |= MDB_NOSYNC; /* LMDB: a system crash can lose commits and damage the env */
    else
        eflags |= MDB_NOMETASYNC; /* one map flush per commit; D at xm_env_sync (top) */
    st->unsafe = (flags & XM_OPEN_UNSAFE_NOSYNC) != 0;
    st->commits = 1; /* open_dbs's commit: the first xm_env_sync covers it */
    pthread_mutex_init(&st->sync_mu, NULL);
    pthread_mutex_init(&st->punch_mu, NULL);
    pthread_cond_init(&st->punch_cv, NULL);
    if ((rc = mdb_env_open(st->env, dir_path, eflags, 0600)))
        goto fail;
    /* The structure first: opening the databases already walks the main B-tree. */
    uint64_t bad_pgno;
    if ((rc = refresh_map(st)) || (rc = xm_verify(st, &bad_pgno)) || (rc = open_dbs(st, flags)))
        goto fail;
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
    for (int i = 0; i < RMW_LOCKS; i++)
        pthread_mutex_init(&st->rmw[i], NULL);
    xm_space_open(st); /* before the committer starts: its commits top the headroom up */
    if ((rc = xm_batch_init(st))) {
        xm_space_close(st);
        close(st->pool_fd);
        goto fail;
    }
    open_stores[slot] = st;
    pthread_mutex_unlock(&open_mu);
    *out = st;
    return XM_OK;
fail:
    if (st->env)
        mdb_env_close(st->env);
    free(st);
    pthread_mutex_unlock(&open_mu);
    return xm_rc(rc);
}

static void drain_rtxns(xm_store *st)
{
    pthread_mutex_lock(&st->mu);
    for (int i = 0; i < st->nrtxn; i++)
        mdb_txn_abort(st->rtxn[i]);
    st->nrtxn = 0;
    pthread_mutex_unlock(&st->mu);
}

void xm_close(xm_store *st)
{
    if (!st)
        return;
    pthread_mutex_lock(&open_mu);
    for (int i = 0; i < MAX_OPEN; i++)
        if (open_stores[i] == st)
            open_stores[i] = NULL;
    pthread_mutex_unlock(&open_mu);
    xm_batch_fini(st);
    (void)xm_env_sync(st); /* a clean close leaves every commit durable (a no-op if synced) */
    drain_rtxns(st);
    mdb_env_close(st->env);
    if (st->pool_fd >= 0)
        close(st->pool_fd);
    pthread_rwlock_destroy(&st->gate);
    pthread_mutex_destroy(&st->sync_mu);
    pthread_mutex_destroy(&st->punch_mu);
    pthread_cond_destroy(&st->punch_cv);
    pthread_mutex_destroy(&st->mu);
    for (int i = 0; i < RMW_LOCKS; i++)
        pthread_mutex_destroy(&st->rmw[i]);
    xm_space_close(st);
    free(st->vols);
    xm_crypt_close(st); /* wipe keys */
    free(st);
}

/* mdb_env_sync(env, 1) unless no commit happened since the last one: every commit counted
 * before it is durable after it (with MDB_WRITEMAP it msync()s the whole map, meta pages
 * included). */
static int env_sync(xm_store *st)
{
    uint64_t c = __atomic_load_n(&st->commits, __ATOMIC_ACQUIRE);
    int rc = XM_OK;
    pthread_mutex_lock(&st->sync_mu);
    if (st->synced_commits < c) {
        rc = xm_rc(mdb_env_sync(st->env, 1));
        if (rc == XM_OK)
            st->synced_commits = c;
    }
    pthread_mutex_unlock(&st->sync_mu);
    return rc;
}

void xm_commit_done(xm_store *st)
{
    __atomic_add_fetch(&st->commits, 1, __ATOMIC_RELEASE);
}

int xm_env_sync(xm_store *st)
{
    /* An unsafe_nosync store promises nothing between FLUSHes (engine.durable syncs its
     * control ops with xm_sync). */
    return st->unsafe ? XM_OK : env_sync(st);
}

int xm_sync(xm_store *st)
{
    /* One pool fdatasync covers every write completed before this call: in place, and the
     * data of every overlay entry published so far.  Then the batch (its commit skips its own
     * fdatasync: covered), then the map's durability point. */
    int rc = xm_batch_sync_data(st);
    if (rc == XM_OK)
        rc = xm_batch_commit(st);
    if (rc)
        return rc;
    xm_batch_error(st); /* a failure of the committer's was retried by this commit */
    return env_sync(st);
}

void xm_get_stats(xm_store *st, xm_stats *out)
{
    out->records_read = __atomic_load_n(&st->stats.records_read, __ATOMIC_RELAXED);
    out->cursor_steps = __atomic_load_n(&st->stats.cursor_steps, __ATOMIC_RELAXED);
    out->fast_reads = __atomic_load_n(&st->stats.fast_reads, __ATOMIC_RELAXED);
    out->fast_writes = __atomic_load_n(&st->stats.fast_writes, __ATOMIC_RELAXED);
    out->slow_writes = __atomic_load_n(&st->stats.slow_writes, __ATOMIC_RELAXED);
    out->redirected_writes = __atomic_load_n(&st->stats.redirected_writes, __ATOMIC_RELAXED);
    out->dropped_runs = __atomic_load_n(&st->stats.dropped_runs, __ATOMIC_RELAXED);
}

int xm_env_info(xm_store *st, uint64_t *last_txnid, uint64_t *map_pages_used, uint64_t *page_size)
{
    MDB_envinfo ei;
    MDB_stat ms;
    int rc;
    if ((rc = mdb_env_info(st->env, &ei)) || (rc = mdb_env_stat(st->env, &ms)))
        return xm_rc(rc);
    *last_txnid = ei.me_last_txnid;
    *map_pages_used = ei.me_last_pgno + 1;
    *page_size = ms.ms_psize;
    return XM_OK;
}

uint64_t xm_map_size(xm_store *st)
{
    return st->map_size;
}

int xm_set_mapsize(xm_store *st, uint64_t map_bytes)
{
    /* The pooled read transactions are reset (they hold no snapshot), but LMDB asks for no
     * transaction at all: end them too; the hot path begins new ones. */
    pthread_mutex_lock(&st->apply_mu); /* the committer begins no transaction meanwhile */
    drain_rtxns(st);
    int rc = mdb_env_set_mapsize(st->env, map_bytes);
    if (rc == 0)
        rc = refresh_map(st);
    pthread_mutex_unlock(&st->apply_mu);
    return xm_rc(rc);
}

/* ---- the read-transaction pool ------------------------------------------------------------ */

int xm_rtxn_get(xm_store *st, MDB_txn **out)
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
    return xm_rc(mdb_txn_begin(st->env, NULL, MDB_RDONLY, out));
}

void xm_rtxn_put(xm_store *st, MDB_txn *t)
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

/* ---- the gate and the volume table ------------------------------------------------------- */

void xm_gate_enter(xm_store *st) { pthread_rwlock_rdlock(&st->gate); }
void xm_gate_leave(xm_store *st) { pthread_rwlock_unlock(&st->gate); }
void xm_gate_close(xm_store *st) { pthread_rwlock_wrlock(&st->gate); }
void xm_gate_open(xm_store *st) { pthread_rwlock_unlock(&st->gate); }

int xm_vol_config(xm_store *st, uint32_t vol, uint64_t size_bytes, uint64_t max_snap, int writable)
{
    if (vol >= st->nvols) {
        if (vol > UINT32_MAX - 64)
            return EINVAL;
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
