/*
 * xm_drop.c - the cached pool pages of blocks that a batch moved from the live map to a
 * snapshot's dead list (xm_row_overlay_c) are dropped from the page cache, by a thread of
 * their own (POSIX_FADV_DONTNEED), so that the pages the next redirected writes need come from
 * memory that was just in use.
 *
 * Why: an in-place write overwrites a pool page the page cache holds; a redirected write lands
 * on a block nobody wrote, so its pwrite(2) has the kernel allocate, zero and charge a new page,
 * on the request thread, which is what limits a connection (one request at a time).  The old
 * block's page meanwhile stays cached for nobody but a snapshot's rare reader, and the page
 * cache grows into memory that sat free.  On the benchmark's VM such memory is dear: free page
 * reporting is on, so a page that sat free is a hypervisor fault when touched again (touching
 * 18 GiB of free memory took 58 s of system time, ~12 us a page); perf of fio's 4 KiB random
 * writes after a snapshot put the copy into a fresh page at 26 % of the request thread's
 * samples (2.5 % in place), and the server's CPU per first write rose from 21 to 52 us over
 * three rounds.  With the superseded pages handed back, the writes reuse them while they are
 * warm (docs/design.md, "The page cache under redirected writes", has the figures).
 *
 * A hint, never a correctness step: DONTNEED drops clean pages only (the kernel keeps dirty
 * ones and those under writeback), a dropped page is read from the disk again when a snapshot
 * needs it, and the kernel may drop any clean page on its own at any time.  Nothing in the map
 * or the pool's contents changes, so there is no Python twin.  The queue is bounded; what does
 * not fit is not dropped.  A pool on a block device is left alone (no page cache of ours to
 * manage there).  SNAPDISK_DROP=0 turns it off (for A/B measurements).
 */
#include "xm_internal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define DROPS 16384     /* runs waiting (a batch is due at ov_max / 2 = 16k entries) */
#define DROP_SLICE 256  /* handed over this many at a time */

static void *dropper(void *arg)
{
    xm_store *st = arg;
    xm_run runs[DROP_SLICE];
    pthread_mutex_lock(&st->drop_mu);
    for (;;) {
        while (!st->drop_stop && st->drop_n == 0)
            pthread_cond_wait(&st->drop_cv, &st->drop_mu);
        if (st->drop_stop)
            break;
        size_t n = st->drop_n < DROP_SLICE ? st->drop_n : DROP_SLICE;
        st->drop_n -= n;
        memcpy(runs, st->drop_q + st->drop_n, n * sizeof *runs);
        pthread_mutex_unlock(&st->drop_mu);
        for (size_t i = 0; i < n; i++)
            (void)posix_fadvise(st->pool_fd, (off_t)(runs[i].pbn * XM_BLOCK_SIZE),
                                (off_t)(runs[i].len * XM_BLOCK_SIZE), POSIX_FADV_DONTNEED);
        __atomic_add_fetch(&st->stats.dropped_runs, n, __ATOMIC_RELAXED);
        pthread_mutex_lock(&st->drop_mu);
    }
    pthread_mutex_unlock(&st->drop_mu);
    return NULL;
}

void xm_drop_init(xm_store *st)
{
    const char *ev = getenv("SNAPDISK_DROP");
    struct stat sb;
    pthread_mutex_init(&st->drop_mu, NULL);
    pthread_cond_init(&st->drop_cv, NULL);
    st->drop_n = 0;
    st->drop_stop = 0;
    st->drop_on = 0;
    if ((ev && ev[0] == '0') || fstat(st->pool_fd, &sb) || !S_ISREG(sb.st_mode))
        return;
    if (!(st->drop_q = malloc(DROPS * sizeof *st->drop_q)))
        return;
    if (pthread_create(&st->drop_thr, NULL, dropper, st) == 0)
        st->drop_on = 1;
}

void xm_drop_fini(xm_store *st)
{
    if (st->drop_on) {
        pthread_mutex_lock(&st->drop_mu);
        st->drop_stop = 1;
        pthread_cond_broadcast(&st->drop_cv);
        pthread_mutex_unlock(&st->drop_mu);
        pthread_join(st->drop_thr, NULL);
        st->drop_on = 0;
    }
    free(st->drop_q);
    st->drop_q = NULL;
    pthread_mutex_destroy(&st->drop_mu);
    pthread_cond_destroy(&st->drop_cv);
}

void xm_drop_add(xm_store *st, uint64_t pbn, uint64_t len)
{
    if (!st->drop_on)
        return;
    pthread_mutex_lock(&st->drop_mu);
    if (st->drop_n < DROPS) /* (the thread is woken once per batch: xm_drop_kick) */
        st->drop_q[st->drop_n++] = (xm_run){pbn, len};
    pthread_mutex_unlock(&st->drop_mu);
}

void xm_drop_kick(xm_store *st)
{
    if (!st->drop_on)
        return;
    pthread_mutex_lock(&st->drop_mu);
    if (st->drop_n)
        pthread_cond_signal(&st->drop_cv);
    pthread_mutex_unlock(&st->drop_mu);
}
