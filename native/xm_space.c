/*
 * xm_space.c - room for the metadata on a filesystem that fills up (issue 10 item 1).
 *
 * The danger: LMDB runs with MDB_WRITEMAP (xm_env.c), so data.mdb is a sparse file the size of
 * the map, and a transaction writes its new pages through the shared mapping.  When the
 * filesystem has no block left for such a page, the kernel cannot fail a store to memory: the
 * process gets SIGBUS (the LMDB documentation's caveat for MDB_WRITEMAP).  The pool file is
 * written with pwrite(2), whose ENOSPC is an ordinary error (xm_pool.c), so the map is the one
 * place a full filesystem can crash the server.
 *
 * The cure: data.mdb's pages get real blocks before LMDB uses them.  LMDB takes new pages at
 * its last used page + 1 (me_last_pgno; freed pages below it were all written once, so they
 * have blocks), so the store keeps `reserved` bytes of data.mdb allocated with fallocate(2),
 * `ahead` bytes past the last used page: after every commit (xm_space_after_commit, called from
 * the commit sites) it tops the reservation up once the headroom falls under 3/4 of `ahead`.
 * When the filesystem cannot give the blocks (ENOSPC: as much as it can give is taken), the
 * headroom shrinks, and before a write transaction begins, xm_space_check refuses:
 *   - XM_SPACE_GROW, a write that allocates (a redirected write: it adds records and may
 *     split pages), under `ahead`/2 of headroom, with ENOSPC: the client sees "no space";
 *   - XM_SPACE_ANY, every other write transaction (snapshot create and delete, volume delete,
 *     the flush's release of pending blocks), only under `ahead`/8: those mostly free space,
 *     and the band between the two thresholds is kept for them.
 * Reads, in-place writes (no map change) and flushes need no new page and always work.  Space
 * freed on the filesystem (snapshots deleted, their blocks punched out of the pool; files
 * removed) is taken at the next check or commit, and writes work again.
 *
 * `ahead` is 1/16 of the filesystem's size, at least 2 MiB and at most 64 MiB: a redirected
 * write's transaction dirties tens of pages, a snapshot delete about one page per 80 records
 * it drops.  Simplification, admitted: one transaction that needs more than the headroom left
 * at its start (deleting a snapshot of millions of scattered records on a full filesystem)
 * could still reach an unbacked page; LMDB gives no way to bound a transaction's pages.  A
 * filesystem without fallocate (EOPNOTSUPP) gets the same thresholds against its free space
 * (statvfs), which a concurrent writer can take away: best effort there, as on a copy-on-write
 * filesystem (btrfs), where an allocated block is rewritten elsewhere.  lock.mdb, LMDB's
 * other shared mapping (the reader table), is allocated whole at open for the same reason.
 */
#include "xm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define AHEAD_MIN ((uint64_t)2 << 20)
#define AHEAD_MAX ((uint64_t)64 << 20)
#define ALIGN ((uint64_t)1 << 20) /* reservations end on a MiB */

static int lmdb_used(xm_store *st, uint64_t *used)
{
    MDB_envinfo ei;
    int rc = mdb_env_info(st->env, &ei);
    if (rc)
        return rc;
    *used = ((uint64_t)ei.me_last_pgno + 1) * st->space_psize;
    return XM_OK;
}

static uint64_t fs_free(int fd)
{
    struct statvfs sv;
    if (fstatvfs(fd, &sv) != 0)
        return UINT64_MAX;
    return (uint64_t)sv.f_bavail * sv.f_frsize;
}

/* Allocate [st->space_reserved, want) of data.mdb, or as much of it as the filesystem gives
 * (halving the step after each ENOSPC).  Called with space_mu held. */
static void extend(xm_store *st, int fd, uint64_t want)
{
    if (want > st->map_size)
        want = st->map_size;
    uint64_t step = want > st->space_reserved ? want - st->space_reserved : 0;
    while (step >= st->space_psize && !st->space_nofalloc) {
        step -= step % st->space_psize;
        if (fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)st->space_reserved, (off_t)step) == 0) {
            st->space_reserved += step;
            step = want - st->space_reserved;
            continue;
        }
        if (errno == EOPNOTSUPP || errno == ENOSYS)
            st->space_nofalloc = 1;
        else if (errno == EINTR)
            continue;
        else if (errno != ENOSPC && errno != EDQUOT)
            break;
        step /= 2;
    }
}

/* The headroom after topping the reservation up if it is under `below`. */
static uint64_t headroom(xm_store *st, uint64_t below)
{
    uint64_t used;
    int fd;
    if (lmdb_used(st, &used) || mdb_env_get_fd(st->env, &fd))
        return 0;
    pthread_mutex_lock(&st->space_mu);
    if (st->space_reserved < used)
        st->space_reserved = used; /* written pages all have blocks */
    if (st->space_reserved - used < below)
        extend(st, fd, (used + st->space_ahead + ALIGN - 1) / ALIGN * ALIGN);
    uint64_t h = st->space_reserved - used;
    if (st->space_reserved >= st->map_size)
        h = st->space_ahead; /* all of the map has blocks: past it LMDB says MDB_MAP_FULL */
    else if (st->space_nofalloc) {
        uint64_t f = fs_free(fd);
        h = f < st->space_ahead ? f : st->space_ahead;
    }
    st->space_low = h < st->space_ahead / 2;
    pthread_mutex_unlock(&st->space_mu);
    return h;
}

void xm_space_open(xm_store *st)
{
    MDB_stat ms;
    struct statvfs sv;
    int fd;
    pthread_mutex_init(&st->space_mu, NULL);
    st->space_psize = mdb_env_stat(st->env, &ms) == 0 ? ms.ms_psize : 4096;
    st->space_ahead = AHEAD_MIN;
    if (mdb_env_get_fd(st->env, &fd) == 0 && fstatvfs(fd, &sv) == 0) {
        uint64_t a = (uint64_t)sv.f_blocks * sv.f_frsize / 16;
        st->space_ahead = a < AHEAD_MIN ? AHEAD_MIN : a > AHEAD_MAX ? AHEAD_MAX : a;
        st->space_ahead -= st->space_ahead % ALIGN;
    }
    /* lock.mdb: LMDB sized it at open; give it its blocks (a failure is left to LMDB). */
    const char *dir;
    char path[PATH_MAX];
    if (mdb_env_get_path(st->env, &dir) == 0 &&
        snprintf(path, sizeof path, "%s/lock.mdb", dir) < (int)sizeof path) {
        int lfd = open(path, O_RDWR | O_CLOEXEC);
        struct stat sb;
        if (lfd >= 0) {
            if (fstat(lfd, &sb) == 0 && sb.st_size > 0)
                (void)fallocate(lfd, FALLOC_FL_KEEP_SIZE, 0, sb.st_size);
            close(lfd);
        }
    }
    (void)headroom(st, UINT64_MAX);
}

void xm_space_close(xm_store *st)
{
    pthread_mutex_destroy(&st->space_mu);
}

void xm_space_after_commit(xm_store *st)
{
    (void)headroom(st, st->space_ahead / 4 * 3);
}

int xm_space_check(xm_store *st, int what)
{
    uint64_t floor = what == XM_SPACE_GROW ? st->space_ahead / 2 : st->space_ahead / 8;
    /* Top up below 3/4 of ahead (as after a commit), so refusals retry the filesystem. */
    return headroom(st, st->space_ahead / 4 * 3) < floor ? ENOSPC : XM_OK;
}

int xm_space_info(xm_store *st, xm_space *out)
{
    uint64_t used;
    int fd, rc;
    if ((rc = lmdb_used(st, &used)) || (rc = mdb_env_get_fd(st->env, &fd)))
        return xm_rc(rc);
    out->fs_free_bytes = fs_free(fd);
    pthread_mutex_lock(&st->space_mu);
    out->meta_used_bytes = used;
    out->meta_reserved_bytes = st->space_reserved > used ? st->space_reserved : used;
    out->ahead_bytes = st->space_ahead;
    out->low = st->space_low;
    out->no_fallocate = st->space_nofalloc;
    pthread_mutex_unlock(&st->space_mu);
    return XM_OK;
}
