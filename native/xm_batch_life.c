/*
 * xm_batch_life.c - group commit's committer thread, its start and stop, the public knobs
 * (xm.h), and a snapshot's hooks (its transaction leaves the overlay alone).  The
 * overlay and its application are xm_batch.c.
 */
#include "xm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void *committer(void *arg)
{
    xm_store *st = arg;
    pthread_mutex_lock(&st->ov_mu);
    while (!st->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t ns = (uint64_t)ts.tv_nsec + (st->interval_us ? st->interval_us : 1000000) * 1000;
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        if (pthread_cond_timedwait(&st->cm_cv, &st->ov_mu, &ts) != ETIMEDOUT)
            continue; /* stop, or a new interval */
        /* a snapshot waiting for LMDB's writer lock goes first (xm_batch.c, apply) */
        if (st->ov_count == 0 || st->interval_us == 0 ||
            __atomic_load_n(&st->snap_want, __ATOMIC_ACQUIRE))
            continue;
        pthread_mutex_unlock(&st->ov_mu);
        int rc = xm_batch_commit_preemptible(st);
        pthread_mutex_lock(&st->ov_mu);
        if (rc)
            st->batch_err = rc;
    }
    pthread_mutex_unlock(&st->ov_mu);
    return NULL;
}

int xm_batch_init(xm_store *st)
{
    st->ov_max = OV_MAX_DEFAULT;
    st->ov_slots = 4 * OV_MAX_DEFAULT; /* load factor <= 1/2 (xm_ov_insert's bound) */
    st->interval_us = OV_INTERVAL_US;
    st->ov = calloc(st->ov_slots, sizeof *st->ov);
    st->ov_spare = calloc(st->ov_slots / 2, sizeof *st->ov_spare);
    if (!st->ov || !st->ov_spare) {
        free(st->ov);
        free(st->ov_spare);
        st->ov = NULL;
        return ENOMEM;
    }
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
    return XM_OK;
}

void xm_batch_fini(xm_store *st)
{
    if (!st->ov)
        return;
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
    uint64_t n = st->ov_count;
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
    __atomic_sub_fetch(&st->snap_want, 1, __ATOMIC_RELEASE);
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
