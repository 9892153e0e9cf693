/*
 * xm_pool.c - the pool seam: the only code that touches the pool file (block N at byte N*4096,
 * sparse).  The hot path, the redirect-on-write path and Python's Pool (through cffi) all read,
 * write and punch through the functions here.
 *
 * Whole blocks only: a request that starts or ends inside a block reads that block whole (and
 * on a write patches it and writes it back whole: read-modify-write under a striped lock, so two
 * writes to different bytes of one block cannot lose each other's bytes; overlapping concurrent
 * writes have no defined order in NBD anyway).  That is what a block cipher needs, and this is
 * the one place it goes: every call names the volume whose data the blocks hold and the logical
 * block the first one holds for it, and an encrypted volume's blocks (xm_crypt.c: AES-256-XTS,
 * tweak = that logical block number, or the pbn for legacy volumes) are decrypted in the
 * caller's buffer after each read and encrypted into a bounce buffer before each write, so only
 * ciphertext reaches the file.  A locked volume's I/O is XM_ELOCKED before the file is touched.
 * Clones share blocks, so they share their origin's key (the Python side registers it).  A
 * thread in raw mode (send, backup, receive, restore; xm_crypt.c) moves encrypted volumes'
 * blocks as stored, whole blocks only.
 *
 * Errors are errno values; a full filesystem is ENOSPC (EDQUOT, a quota, too: the client is
 * told "no space" either way).
 */
#include "xm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>
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

/* Normalize (pbn, lba, offset) so the offset is inside the first block; check the range fits. */
static int locate(uint64_t *pbn, uint64_t *lba, uint64_t *off, uint64_t nbytes)
{
    *pbn += *off / XM_BLOCK_SIZE;
    if (*lba != XM_NO_LBA)
        *lba += *off / XM_BLOCK_SIZE;
    *off %= XM_BLOCK_SIZE;
    if (*pbn > POOL_MAX_BYTES / XM_BLOCK_SIZE || nbytes > POOL_MAX_BYTES - *pbn * XM_BLOCK_SIZE - *off)
        return XM_ECORRUPT; /* addresses come from the map: only a damaged one gets here */
    return XM_OK;
}

#define BOUNCE_MAX (256 * XM_BLOCK_SIZE) /* encrypt at most 1 MiB per pwrite */

/* A raw call must move whole blocks: a sub-block piece of ciphertext means nothing. */
static int raw_whole(const xm_crypt *x, uint64_t off, uint64_t nbytes)
{
    return x->raw && (off || nbytes % XM_BLOCK_SIZE) ? EINVAL : XM_OK;
}

/* Blocks pbn.. with tweaks tweak.. (xm_crypt.tweak plus the block's index in the call). */
static int read_blocks(xm_store *st, EVP_CIPHER_CTX *c, uint64_t pbn, uint64_t tweak,
                       uint64_t nblocks, uint8_t *buf)
{
    int rc = pread_full(st->pool_fd, buf, nblocks * XM_BLOCK_SIZE, pbn * XM_BLOCK_SIZE);
    if (rc == XM_OK && c) /* a never-written (zero) block decrypts to noise: nothing reads one */
        rc = xm_crypt_blocks(c, tweak, nblocks, buf, buf);
    return rc;
}

static int write_blocks(xm_store *st, EVP_CIPHER_CTX *c, uint64_t pbn, uint64_t tweak,
                        uint64_t nblocks, const uint8_t *buf)
{
    if (!c)
        return pwrite_full(st->pool_fd, buf, nblocks * XM_BLOCK_SIZE, pbn * XM_BLOCK_SIZE);
    /* buf is the caller's (and plaintext): encrypt into a bounce buffer, up to 1 MiB a time. */
    uint64_t chunk = nblocks * XM_BLOCK_SIZE < BOUNCE_MAX ? nblocks : BOUNCE_MAX / XM_BLOCK_SIZE;
    uint8_t *bounce = malloc(chunk * XM_BLOCK_SIZE);
    if (!bounce)
        return ENOMEM;
    int rc = XM_OK;
    for (uint64_t i = 0; i < nblocks && rc == XM_OK; i += chunk) {
        uint64_t n = nblocks - i < chunk ? nblocks - i : chunk;
        rc = xm_crypt_blocks(c, tweak + i, n, buf + i * XM_BLOCK_SIZE, bounce);
        if (rc == XM_OK)
            rc = pwrite_full(st->pool_fd, bounce, n * XM_BLOCK_SIZE, (pbn + i) * XM_BLOCK_SIZE);
    }
    free(bounce); /* ciphertext only: nothing to wipe */
    return rc;
}

static int pool_read(xm_store *st, EVP_CIPHER_CTX *c, uint64_t pbn, uint64_t tweak, uint64_t off,
                     uint64_t nbytes, uint8_t *buf)
{
    uint8_t blk[XM_BLOCK_SIZE];
    int rc;
    if (off && nbytes) { /* a partial first block */
        uint64_t n = XM_BLOCK_SIZE - off < nbytes ? XM_BLOCK_SIZE - off : nbytes;
        if ((rc = read_blocks(st, c, pbn, tweak, 1, blk)))
            return rc;
        memcpy(buf, blk + off, n);
        buf += n;
        nbytes -= n;
        pbn++;
        tweak++;
    }
    uint64_t whole = nbytes / XM_BLOCK_SIZE;
    if (whole && (rc = read_blocks(st, c, pbn, tweak, whole, buf)))
        return rc;
    buf += whole * XM_BLOCK_SIZE;
    nbytes -= whole * XM_BLOCK_SIZE;
    if (nbytes) { /* a partial last block */
        if ((rc = read_blocks(st, c, pbn + whole, tweak + whole, 1, blk)))
            return rc;
        memcpy(buf, blk, nbytes);
    }
    return XM_OK;
}

int xm_pool_read(xm_store *st, uint32_t vol, uint64_t pbn, uint64_t lba, uint64_t off,
                 uint64_t nbytes, uint8_t *buf)
{
    xm_crypt x;
    int rc;
    if ((rc = locate(&pbn, &lba, &off, nbytes)) || (rc = xm_crypt_begin(st, vol, 0, pbn, lba, &x)))
        return rc;
    rc = raw_whole(&x, off, nbytes);
    if (rc == XM_OK)
        rc = pool_read(st, x.c, pbn, x.tweak, off, nbytes, buf);
    EVP_CIPHER_CTX_free(x.c);
    return rc;
}

/* Write n bytes at off inside block pbn, keeping the block's other bytes. */
static int patch_block(xm_store *st, EVP_CIPHER_CTX *enc, EVP_CIPHER_CTX *dec, uint64_t pbn,
                       uint64_t tweak, uint64_t off, uint64_t n, const uint8_t *src)
{
    uint8_t blk[XM_BLOCK_SIZE];
    pthread_mutex_t *mu = &st->rmw[pbn % RMW_LOCKS];
    pthread_mutex_lock(mu);
    int rc = read_blocks(st, dec, pbn, tweak, 1, blk);
    if (rc == XM_OK) {
        memcpy(blk + off, src, n);
        rc = write_blocks(st, enc, pbn, tweak, 1, blk);
    }
    pthread_mutex_unlock(mu);
    if (dec)
        OPENSSL_cleanse(blk, sizeof blk); /* plaintext of an encrypted volume */
    return rc;
}

static int pool_write(xm_store *st, EVP_CIPHER_CTX *enc, EVP_CIPHER_CTX *dec, uint64_t pbn,
                      uint64_t tweak, uint64_t off, uint64_t nbytes, const uint8_t *buf)
{
    int rc;
    if (off && nbytes) {
        uint64_t n = XM_BLOCK_SIZE - off < nbytes ? XM_BLOCK_SIZE - off : nbytes;
        if ((rc = patch_block(st, enc, dec, pbn, tweak, off, n, buf)))
            return rc;
        buf += n;
        nbytes -= n;
        pbn++;
        tweak++;
    }
    uint64_t whole = nbytes / XM_BLOCK_SIZE;
    if (whole && (rc = write_blocks(st, enc, pbn, tweak, whole, buf)))
        return rc;
    buf += whole * XM_BLOCK_SIZE;
    nbytes -= whole * XM_BLOCK_SIZE;
    if (nbytes)
        return patch_block(st, enc, dec, pbn + whole, tweak + whole, 0, nbytes, buf);
    return XM_OK;
}

int xm_pool_write(xm_store *st, uint32_t vol, uint64_t pbn, uint64_t lba, uint64_t off,
                  uint64_t nbytes, const uint8_t *buf)
{
    xm_crypt enc, dec = {NULL, 0, 0};
    int rc;
    if ((rc = locate(&pbn, &lba, &off, nbytes)) || (rc = xm_crypt_begin(st, vol, 1, pbn, lba, &enc)))
        return rc;
    if ((rc = raw_whole(&enc, off, nbytes)))
        return rc;
    /* A decrypting context too only if a partial block needs read-modify-write. */
    if (enc.c && ((off && nbytes) || (off + nbytes) % XM_BLOCK_SIZE) &&
        (rc = xm_crypt_begin(st, vol, 0, pbn, lba, &dec))) {
        EVP_CIPHER_CTX_free(enc.c);
        return rc;
    }
    rc = pool_write(st, enc.c, dec.c, pbn, enc.tweak, off, nbytes, buf);
    EVP_CIPHER_CTX_free(enc.c);
    EVP_CIPHER_CTX_free(dec.c);
    return rc;
}

int xm_pool_punch(xm_store *st, uint64_t pbn, uint64_t nblocks)
{
    uint64_t off = 0, lba = XM_NO_LBA;
    int rc;
    if (nblocks > POOL_MAX_BYTES / XM_BLOCK_SIZE || (rc = locate(&pbn, &lba, &off, nblocks * XM_BLOCK_SIZE)))
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

/* ---- the punch guard (xm.h) ---------------------------------------------------------------- */

void xm_punch_hold(xm_store *st)
{
    pthread_mutex_lock(&st->punch_mu);
    st->punch_holds++;
    pthread_mutex_unlock(&st->punch_mu);
}

void xm_punch_release(xm_store *st)
{
    pthread_mutex_lock(&st->punch_mu);
    if (--st->punch_holds == 0)
        pthread_cond_broadcast(&st->punch_cv);
    pthread_mutex_unlock(&st->punch_mu);
}

void xm_punch_wait(xm_store *st)
{
    pthread_mutex_lock(&st->punch_mu);
    while (st->punch_holds)
        pthread_cond_wait(&st->punch_cv, &st->punch_mu);
    pthread_mutex_unlock(&st->punch_mu);
}

int xm_punch_holders(xm_store *st)
{
    pthread_mutex_lock(&st->punch_mu);
    int n = st->punch_holds;
    pthread_mutex_unlock(&st->punch_mu);
    return n;
}
