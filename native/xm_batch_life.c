/*
 * xm_batch_life.c - group commit's committer thread, its start and stop, and the public knobs
 * (xm.h).  The overlay and its application are xm_batch.c.
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
