/*
 * xm_batch_life.c - group commit's committer thread, its start and stop, the public knobs
 * (xm.h), and a snapshot's hooks (its transaction leaves the overlay alone).  The
 * overlay and its application are xm_batch.c.
 */
#include "xm_internal.h"

#include <fcntl.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A batch is due when the overlay holds half its bound (a writer that crosses it wakes the
 * committer) or its oldest entry is interval_us old.  Big batches are what make group
 * commit cheap: a batch's fdatasync and map flush are paid once, and its entries share B-tree
 * pages (per redirected write the committer's CPU went from ~24 us at a 5 ms interval to ~5 us
 * at 250 ms, 4 KiB random writes at ~45k/s; benchmarks/why.md).  Nothing is promised between
 * FLUSHes, so the interval only bounds how much a FLUSH or a crash has to deal with. */
static uint64_t deadline(const xm_store *st) /* the oldest entry's; none: UINT64_MAX */
{
    return st->ov_count && st->interval_us ? st->ov_first_ns + st->interval_us * 1000 : UINT64_MAX;
}

static int due(const xm_store *st, uint64_t now)
{
    return st->ov_count >= st->ov_max / 2 || now >= deadline(st);
}

/* Start writeback of the pool's dirty pages (SYNC_FILE_RANGE_WRITE: initiate, do not wait) if
 * requests wrote since the last time.  Without it the page cache holds up to gigabytes of
 * written data (the kernel's background threshold is 10 % of memory, or 30 s), and the next
 * pool fdatasync (a batch's data-before-map, a FLUSH) has to write all of it at once: ~1 s
 * stalls of every write behind a full overlay, measured in scenario 3 right after its
 * sequential rewrite.  PostgreSQL's *_flush_after settings do the same for the same reason.
 * Not a durability step: fdatasync still makes data durable; a failure here is ignored. */
static void writeback_kick(xm_store *st, uint64_t *last_writes)
{
    uint64_t w = __atomic_load_n(&st->stats.fast_writes, __ATOMIC_RELAXED) +
                 __atomic_load_n(&st->stats.redirected_writes, __ATOMIC_RELAXED);
    if (w == *last_writes)
        return;
    *last_writes = w;
    (void)sync_file_range(st->pool_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

static void *committer(void *arg)
{
    xm_store *st = arg;
    uint64_t kicked = 0, writes = 0;
    pthread_mutex_lock(&st->ov_mu);
    while (!st->stop) {
        uint64_t now = xm_now_ns();
        if (now - kicked >= WB_KICK_NS) {
            pthread_mutex_unlock(&st->ov_mu);
            writeback_kick(st, &writes);
            pthread_mutex_lock(&st->ov_mu);
            kicked = now;
            continue; /* (the time moved on) */
        }
        /* a snapshot waiting for LMDB's writer lock goes first (xm_batch.c, apply) */
        int behind = __atomic_load_n(&st->snap_want, __ATOMIC_ACQUIRE);
        if (st->interval_us == 0 || !due(st, now) || behind) {
            /* behind a snapshot, look again in 1 ms; else at the oldest entry's deadline or
             * the next writeback kick (a writer crossing half the bound, a knob or stop wake
             * it earlier) */
            uint64_t at = behind ? now + 1000000u : kicked + WB_KICK_NS;
            if (!behind && deadline(st) < at)
                at = deadline(st);
            struct timespec ts = {(time_t)(at / 1000000000u), (long)(at % 1000000000u)};
            pthread_cond_timedwait(&st->cm_cv, &st->ov_mu, &ts);
            continue;
        }
        pthread_mutex_unlock(&st->ov_mu);
        int rc = xm_batch_commit_preemptible(st);
        pthread_mutex_lock(&st->ov_mu);
        if (rc)
            st->batch_err = rc;
    }
    pthread_mutex_unlock(&st->ov_mu);
    return NULL;
}

/* Touch every page of a fresh calloc()ed table now.  Large callocs are fresh anonymous
 * mappings whose pages fault in on first write (the zero page, then a copy: memcg charge and a
 * TLB shootdown each); the redirected writes of a server's first batch paid ~0.8 us each for
 * that (perf, 64k first writes after a snapshot).  Volatile: a plain zeroing store into
 * calloc()ed memory is one the compiler may drop. */
static void prefault(void *p, size_t n)
{
    volatile uint8_t *b = p;
    for (size_t i = 0; i < n; i += 4096)
        b[i] = 0;
}

int xm_batch_init(xm_store *st)
{
    const char *ev = getenv("SNAPDISK_BATCH_MAX_BLOCKS");
    unsigned long mx = ev ? strtoul(ev, NULL, 10) : 0;
    st->ov_max = mx >= 256 && mx <= (1ul << 22) ? (uint32_t)mx : OV_MAX_DEFAULT;
    st->ov_slots = 4; /* a power of two, load factor <= 1/2 (xm_ov_insert's bound) */
    while (st->ov_slots < 4 * st->ov_max)
        st->ov_slots *= 2;
    ev = getenv("SNAPDISK_BATCH_INTERVAL_US");
    st->interval_us = ev ? strtoull(ev, NULL, 10) : OV_INTERVAL_US;
    st->ov = calloc(st->ov_slots, sizeof *st->ov);
    st->ov_spare = calloc(st->ov_slots / 2, sizeof *st->ov_spare);
    st->ov_prev_cap = st->ov_max / 4;
    st->ov_prev = calloc(st->ov_prev_cap, sizeof *st->ov_prev);
    if (!st->ov || !st->ov_spare || !st->ov_prev) {
        free(st->ov);
        free(st->ov_spare);
        free(st->ov_prev);
        st->ov = NULL;
        return ENOMEM;
    }
    prefault(st->ov, st->ov_slots * sizeof *st->ov);
    prefault(st->ov_spare, st->ov_slots / 2 * sizeof *st->ov_spare);
    prefault(st->ov_prev, st->ov_prev_cap * sizeof *st->ov_prev);
    pthread_mutex_init(&st->ov_mu, NULL);
    pthread_mutex_init(&st->apply_mu, NULL);
    pthread_cond_init(&st->ov_cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&st->cm_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&st->committer, NULL, committer, st) == 0)
        st->committer_on = 1;
    xm_drop_init(st);
    return XM_OK;
}

void xm_batch_fini(xm_store *st)
{
    if (!st->ov)
        return;
    xm_drop_fini(st);
    if (st->committer_on) {
        pthread_mutex_lock(&st->ov_mu);
        st->stop = 1;
        pthread_cond_broadcast(&st->cm_cv);
        pthread_mutex_unlock(&st->ov_mu);
        pthread_join(st->committer, NULL);
        st->committer_on = 0;
    }
    xm_batch_commit(st); /* what a clean close leaves out is lost like any unflushed write */
    pthread_mutex_destroy(&st->ov_mu);
    pthread_mutex_destroy(&st->apply_mu);
    pthread_cond_destroy(&st->ov_cv);
    pthread_cond_destroy(&st->cm_cv);
    free(st->ov);
    free(st->ov_spare);
    free(st->ov_prev);
    st->ov = NULL;
}

/* ---- public knobs (xm.h) ------------------------------------------------------------------ */

int xm_batch_config(xm_store *st, uint64_t interval_us, uint32_t max_blocks)
{
    if (max_blocks == 0 || max_blocks > st->ov_slots / 2)
        return EINVAL;
    pthread_mutex_lock(&st->ov_mu);
    st->interval_us = interval_us;
    st->ov_max = max_blocks;
    pthread_cond_broadcast(&st->cm_cv);
    pthread_mutex_unlock(&st->ov_mu);
    return XM_OK;
}

uint64_t xm_batch_pending(xm_store *st)
{
    pthread_mutex_lock(&st->ov_mu);
    uint64_t n = st->ov_count + st->ov_nprev;
    pthread_mutex_unlock(&st->ov_mu);
    return n;
}

int xm_batch_error(xm_store *st)
{
    pthread_mutex_lock(&st->ov_mu);
    int rc = st->batch_err;
    st->batch_err = 0;
    pthread_mutex_unlock(&st->ov_mu);
    return rc;
}

/* ---- snapshot create (issue 9 item 3; docs/design.md "Group commit") ---------- */

/* Set by xm_batch_snap_begin, consumed by this thread's next xm_wtxn_begin. */
static __thread xm_store *keep_next;

void xm_batch_snap_begin(xm_store *st)
{
    __atomic_add_fetch(&st->snap_want, 1, __ATOMIC_RELEASE); /* a batch in progress stops early */
    keep_next = st;
    /* Wait for that batch (it holds apply_mu from its begin to its settle) before the caller
     * closes the I/O gate, so that I/O does not stand still behind its last chunk and its
     * msync.  (Taking LMDB's writer lock itself before the gate would deadlock: the general
     * write path holds the gate shared while it waits for that lock.) */
    pthread_mutex_lock(&st->apply_mu);
    pthread_mutex_unlock(&st->apply_mu);
}

int xm_batch_keep_taken(xm_store *st)
{
    if (keep_next != st)
        return 0;
    keep_next = NULL;
    return 1;
}

void xm_batch_snap_end(xm_store *st)
{
    keep_next = NULL; /* unused if the snapshot failed before its transaction */
    pthread_mutex_lock(&st->ov_mu);
    __atomic_sub_fetch(&st->snap_want, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&st->ov_cv); /* xm_batch_wait_snapshots */
    pthread_mutex_unlock(&st->ov_mu);
}

void xm_batch_wait_snapshots(xm_store *st)
{
    pthread_mutex_lock(&st->ov_mu);
    while (__atomic_load_n(&st->snap_want, __ATOMIC_ACQUIRE))
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    pthread_mutex_unlock(&st->ov_mu);
}

/* A snapshot's transaction (xm_batch_snap_begin): it leaves the overlay alone, so it holds only
 * its own records, and the I/O gate it runs under is not closed across a batch's apply and
 * fdatasync.  The entries survive it: each keeps its birth, a later write compares that with
 * the volume's newest snapshot (xm_write_row, xm_write_inplace), and the batch that applies
 * them later kills with death = the entry's birth, not the volume's epoch (xm_row_overlay).
 * It publishes nothing while open (ov_foreign, as every foreign transaction) and keeps the
 * reservation: it allocates nothing from FREE (what a replaced automatic snapshot frees goes
 * to PENDING). */
int xm_wtxn_begin_keep(xm_store *st, MDB_txn **out)
{
    int rc = xm_rc(mdb_txn_begin(st->env, NULL, 0, out));
    if (rc)
        return rc;
    pthread_mutex_lock(&st->ov_mu);
    st->ov_foreign = 1;
    while (st->ov_inflight)
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    /* The previous batch may have committed without having settled yet (take_upto's wait);
     * ov_busy then stays set for this transaction's own ov_settle, which takes nothing. */
    while (st->ov_busy)
        pthread_cond_wait(&st->ov_cv, &st->ov_mu);
    st->ov_busy = 1;
    st->ov_ntaken = 0;
    st->ov_txn = *out;
    pthread_mutex_unlock(&st->ov_mu);
    return XM_OK;
}
