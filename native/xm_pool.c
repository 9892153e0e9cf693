/*
 * xm_pool.c - the pool seam: the only code that touches the pool file (block N at byte N*4096,
 * sparse).  The hot path, the redirect-on-write path and Python's Pool (through cffi) all read,
 * write and punch through the functions here.
 *
 * Whole blocks only: a request that starts or ends inside a block reads that block whole (and
 * on a write patches it and writes it back whole: read-modify-write under a striped lock, so two
 * writes to different bytes of one block cannot lose each other's bytes; overlapping concurrent
 * writes have no defined order in NBD anyway).  That is what a block cipher needs, and it is the
 * one place one goes: a per-volume transform hook (for example XTS with the pbn as tweak) would
 * be called on each whole block where the TRANSFORM comments are, decrypting after the read and
 * encrypting a copy before the write.  Its key would come from a table on the store; since
 * clones share blocks, a key belongs to a volume and all its clones, and the seam's callers
 * would then pass the volume (today's signatures take the store and block addresses only).
 *
 * Errors are errno values; a full filesystem is ENOSPC (EDQUOT, a quota, too: the client is
 * told "no space" either way).
 */
#include "xm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The highest byte offset the pool may reach: pbn*4096 + n must fit an off_t. */
#define POOL_MAX_BYTES ((uint64_t)INT64_MAX)

static int pread_full(int fd, uint8_t *buf, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t r = pread(fd, buf, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0) { /* past the end of the sparse pool file: never written, reads as zeros */
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
            return errno == EDQUOT ? ENOSPC : errno;
        }
        buf += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return XM_OK;
}

/* Normalize (pbn, offset) so the offset is inside the first block; check the range fits. */
static int locate(uint64_t *pbn, uint64_t *off, uint64_t nbytes)
{
    *pbn += *off / XM_BLOCK_SIZE;
    *off %= XM_BLOCK_SIZE;
    if (*pbn > POOL_MAX_BYTES / XM_BLOCK_SIZE || nbytes > POOL_MAX_BYTES - *pbn * XM_BLOCK_SIZE - *off)
        return XM_ECORRUPT; /* addresses come from the map: only a damaged one gets here */
    return XM_OK;
}

static int read_blocks(xm_store *st, uint64_t pbn, uint64_t nblocks, uint8_t *buf)
{
    int rc = pread_full(st->pool_fd, buf, nblocks * XM_BLOCK_SIZE, pbn * XM_BLOCK_SIZE);
    /* TRANSFORM: decrypt each block of buf in place here. */
    return rc;
}

static int write_blocks(xm_store *st, uint64_t pbn, uint64_t nblocks, const uint8_t *buf)
{
    /* TRANSFORM: encrypt into a bounce buffer here (buf is the caller's). */
    return pwrite_full(st->pool_fd, buf, nblocks * XM_BLOCK_SIZE, pbn * XM_BLOCK_SIZE);
}

int xm_pool_read(xm_store *st, uint64_t pbn, uint64_t off, uint64_t nbytes, uint8_t *buf)
{
    uint8_t blk[XM_BLOCK_SIZE];
    int rc;
    if ((rc = locate(&pbn, &off, nbytes)))
        return rc;
    if (off && nbytes) { /* a partial first block */
        uint64_t n = XM_BLOCK_SIZE - off < nbytes ? XM_BLOCK_SIZE - off : nbytes;
        if ((rc = read_blocks(st, pbn, 1, blk)))
            return rc;
        memcpy(buf, blk + off, n);
        buf += n;
        nbytes -= n;
        pbn++;
    }
    uint64_t whole = nbytes / XM_BLOCK_SIZE;
    if (whole && (rc = read_blocks(st, pbn, whole, buf)))
        return rc;
    buf += whole * XM_BLOCK_SIZE;
    nbytes -= whole * XM_BLOCK_SIZE;
    if (nbytes) { /* a partial last block */
        if ((rc = read_blocks(st, pbn + whole, 1, blk)))
            return rc;
        memcpy(buf, blk, nbytes);
    }
    return XM_OK;
}

/* Write n bytes at off inside block pbn, keeping the block's other bytes. */
static int patch_block(xm_store *st, uint64_t pbn, uint64_t off, uint64_t n, const uint8_t *src)
{
    uint8_t blk[XM_BLOCK_SIZE];
    pthread_mutex_t *mu = &st->rmw[pbn % RMW_LOCKS];
    pthread_mutex_lock(mu);
    int rc = read_blocks(st, pbn, 1, blk);
    if (rc == XM_OK) {
        memcpy(blk + off, src, n);
        rc = write_blocks(st, pbn, 1, blk);
    }
    pthread_mutex_unlock(mu);
    return rc;
}

int xm_pool_write(xm_store *st, uint64_t pbn, uint64_t off, uint64_t nbytes, const uint8_t *buf)
{
    int rc;
    if ((rc = locate(&pbn, &off, nbytes)))
        return rc;
    if (off && nbytes) {
        uint64_t n = XM_BLOCK_SIZE - off < nbytes ? XM_BLOCK_SIZE - off : nbytes;
        if ((rc = patch_block(st, pbn, off, n, buf)))
            return rc;
        buf += n;
        nbytes -= n;
        pbn++;
    }
    uint64_t whole = nbytes / XM_BLOCK_SIZE;
    if (whole && (rc = write_blocks(st, pbn, whole, buf)))
        return rc;
    buf += whole * XM_BLOCK_SIZE;
    nbytes -= whole * XM_BLOCK_SIZE;
    if (nbytes)
        return patch_block(st, pbn + whole, 0, nbytes, buf);
    return XM_OK;
}

int xm_pool_punch(xm_store *st, uint64_t pbn, uint64_t nblocks)
{
    uint64_t off = 0;
    int rc;
    if (nblocks > POOL_MAX_BYTES / XM_BLOCK_SIZE || (rc = locate(&pbn, &off, nblocks * XM_BLOCK_SIZE)))
        return XM_ECORRUPT;
    if (nblocks == 0)
        return XM_OK;
    if (fallocate(st->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(pbn * XM_BLOCK_SIZE),
                  (off_t)(nblocks * XM_BLOCK_SIZE)) != 0) {
        /* A filesystem without holes just keeps the space: the blocks are free in the
         * allocator all the same, and their content is never read before it is rewritten. */
        return errno == EOPNOTSUPP ? XM_OK : errno;
    }
    return XM_OK;
}

int xm_pool_size_on_disk(xm_store *st, uint64_t *out)
{
    struct stat sb;
    if (fstat(st->pool_fd, &sb) != 0)
        return errno;
    *out = (uint64_t)sb.st_blocks * 512;
    return XM_OK;
}
