/*
 * xm_crypt.c - per-volume data keys for the pool seam (xm_pool.c): AES-256-XTS through OpenSSL's
 * EVP (AES-NI where the CPU has it), one 4 KiB pool block per XTS data unit, the tweak a
 * little-endian u64 in the first 8 of the 16 tweak bytes (dm-crypt's plain64 IV with LUKS2's
 * sector_size 4096).  Confidentiality only: XTS detects no tampering (see docs/encryption.md).
 *
 * The tweak, per volume (its key record's "tweak", given at unlock: xm_vol_set_tweak):
 *   XM_TWEAK_LBA  the LOGICAL block number the pool block holds for the volume (lba / 4096):
 *                 what dm-crypt/LUKS (the sector) and Ceph RBD's LUKS encryption (the image
 *                 offset, shared by snapshots and clones) use.  Ciphertext so made does not
 *                 depend on where the block sits in the pool, so a send stream or a backup can
 *                 carry it as is (raw send) and another store place it anywhere: the receiver
 *                 never needs the key.  Every volume encrypted since store format 3.
 *   XM_TWEAK_PBN  the physical block number (legacy: volumes encrypted under format 2; their
 *                 ciphertext is bound to its pool position, so they are never sent raw).
 *
 * INVARIANT the lba tweak rests on: no path ever maps one pool block at two different logical
 * block numbers.  A map record (lba, pbn, len) maps block lba+i to pbn+i, and every path that
 * makes a record from another keeps that pairing: a clone copies its origin's records (same
 * lba, same pbn: xm_bulk_clone.c, snapshots.clone); a rollback makes the snapshot's records
 * live again at their own lba (xm_bulk_rb.c); splits and merges of records (xm_map.c,
 * extmap.py) keep lba - pbn constant within a record; snapshot copy, import, receive and
 * restore write data to NEW blocks through the write path at the lba they came from.  So a
 * block decrypts alike whichever volume (origin, clone) or view (snapshot, live) maps it, as
 * with the pbn.  The cost (docs/encryption.md): two versions of one logical block (a
 * snapshot's and the live one) are under the same (key, tweak), so someone holding the pool
 * sees which 16-byte units differ between them: what every LUKS disk shows over time and RBD
 * across snapshots.
 *
 * Raw I/O (send, backup, receive, restore): a calling THREAD in raw mode (xm_raw_io) reads and
 * writes encrypted volumes' blocks as stored, without the cipher and whatever the key slot's
 * state (a locked volume included): whole blocks only (EINVAL otherwise: a sub-block
 * read-modify-write of ciphertext would be garbage).  Only those four operations enter it, on
 * their own threads, around their own reads and writes; NBD's threads never do, so no NBD
 * client can read ciphertext or write it.  A thread-scoped mode rather than a flag on every
 * call because the writes of a receive go through the whole write path (in place, the C
 * redirect-on-write path with group commit, the Python general path), whose calls reach this
 * seam on the calling thread: the mode reaches them without a new argument on each.
 *
 * Why 4 KiB units and not 512-byte sectors: per unit, OpenSSL 3.0 needs an EVP_CipherInit_ex
 * to set the tweak, and that call costs as much as encrypting 512 bytes: measured on the first
 * machine, XTS ran at ~2.7-3.0 GB/s in 4 KiB units and ~1.2-1.3 GB/s in 512-byte units (a later
 * machine, AVX-512: 5.1 GB/s in 4 KiB units, tweak set per unit as xm_crypt_blocks does).  The
 * price: a torn 4 KiB write (storage that is only 512-byte atomic) makes the whole block noise
 * instead of a mix of old and new sectors; a block written whole (old or new) always decrypts.
 * XTS is deterministic, so rewriting a block under the same (key, tweak) reveals to someone
 * holding both old and new ciphertext which 16-byte units changed, and nothing else: the
 * accepted property of every XTS disk (LUKS, RBD).
 *
 * A slot per volume id: PLAIN (no cipher, the default), LOCKED (encrypted, no key here: every
 * pool access returns XM_ELOCKED before touching the file, raw I/O excepted), or UNLOCKED
 * (templates of an encrypting and a decrypting context holding the expanded key).  Slots change
 * only with the I/O gate closed (the callers' rule, as for xm_vol_config), so the seam reads
 * them under the shared gate without a lock.  Per call the seam copies a template into a fresh
 * context (no key expansion per request) and frees it after (EVP_CIPHER_CTX_free cleanses it).
 */
#include "xm_internal.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

struct xm_keyslot {
    int state; /* XM_KEY_PLAIN, XM_KEY_LOCKED, XM_KEY_UNLOCKED */
    int tweak; /* XM_TWEAK_PBN (0, legacy) or XM_TWEAK_LBA; kept across lock and unlock */
    EVP_CIPHER_CTX *enc, *dec;
};

/* Raw mode of the calling thread (see the header comment). */
static __thread int raw_io;

void xm_raw_io(int on)
{
    raw_io = on != 0;
}

static void slot_wipe(xm_keyslot *s)
{
    EVP_CIPHER_CTX_free(s->enc); /* frees and cleanses the expanded key */
    EVP_CIPHER_CTX_free(s->dec);
    s->enc = s->dec = NULL;
}

static int slot_grow(xm_store *st, uint32_t vol)
{
    if (vol < st->nkeys)
        return XM_OK;
    uint32_t n = vol + 16;
    xm_keyslot *k = realloc(st->keys, n * sizeof *k);
    if (!k)
        return ENOMEM;
    memset(k + st->nkeys, 0, (n - st->nkeys) * sizeof *k);
    st->keys = k;
    st->nkeys = n;
    return XM_OK;
}

static EVP_CIPHER_CTX *template_ctx(const uint8_t *key, int enc)
{
    /* An explicitly fetched cipher: EVP_aes_256_xts() would be fetched again implicitly. */
    EVP_CIPHER *xts = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
    EVP_CIPHER_CTX *c = xts ? EVP_CIPHER_CTX_new() : NULL;
    if (c && EVP_CipherInit_ex2(c, xts, key, NULL, enc, NULL) != 1) {
        EVP_CIPHER_CTX_free(c);
        c = NULL;
    }
    EVP_CIPHER_free(xts); /* the context holds its own reference */
    return c;
}

int xm_vol_set_key(xm_store *st, uint32_t vol, const uint8_t *key, size_t keylen)
{
    if (keylen != XM_KEY_BYTES)
        return EINVAL;
    /* Once a key is in this process, no core dump and no ptrace by the same user (Linux):
     * the expanded key lives in OpenSSL's contexts, which we cannot mlock. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int rc = slot_grow(st, vol);
    if (rc)
        return rc;
    EVP_CIPHER_CTX *enc = template_ctx(key, 1), *dec = template_ctx(key, 0);
    if (!enc || !dec) { /* e.g. equal key halves, which OpenSSL refuses for XTS */
        EVP_CIPHER_CTX_free(enc);
        EVP_CIPHER_CTX_free(dec);
        return EINVAL;
    }
    xm_keyslot *s = &st->keys[vol];
    slot_wipe(s);
    s->enc = enc;
    s->dec = dec;
    s->state = XM_KEY_UNLOCKED;
    return XM_OK;
}

int xm_vol_lock(xm_store *st, uint32_t vol)
{
    int rc = slot_grow(st, vol);
    if (rc)
        return rc;
    slot_wipe(&st->keys[vol]);
    st->keys[vol].state = XM_KEY_LOCKED;
    return XM_OK;
}

int xm_vol_mark_encrypted(xm_store *st, uint32_t vol, int encrypted)
{
    if (!encrypted)
        return xm_vol_clear_key(st, vol);
    if (vol < st->nkeys && st->keys[vol].state != XM_KEY_PLAIN)
        return XM_OK; /* locked or unlocked already: keep the key */
    return xm_vol_lock(st, vol);
}

int xm_vol_clear_key(xm_store *st, uint32_t vol)
{
    if (vol < st->nkeys) {
        slot_wipe(&st->keys[vol]);
        st->keys[vol].state = XM_KEY_PLAIN;
        st->keys[vol].tweak = XM_TWEAK_PBN;
    }
    return XM_OK;
}

int xm_vol_set_tweak(xm_store *st, uint32_t vol, int mode)
{
    if (mode != XM_TWEAK_PBN && mode != XM_TWEAK_LBA)
        return EINVAL;
    int rc = slot_grow(st, vol);
    if (rc == XM_OK)
        st->keys[vol].tweak = mode;
    return rc;
}

int xm_vol_key_state(xm_store *st, uint32_t vol)
{
    /* Called without the gate (listings): take it shared, as the table may be resized. */
    xm_gate_enter(st);
    int state = vol < st->nkeys ? st->keys[vol].state : XM_KEY_PLAIN;
    xm_gate_leave(st);
    return state;
}

void xm_crypt_close(xm_store *st)
{
    for (uint32_t i = 0; i < st->nkeys; i++)
        slot_wipe(&st->keys[i]);
    free(st->keys);
    st->keys = NULL;
    st->nkeys = 0;
}

int xm_crypt_begin(xm_store *st, uint32_t vol, int enc, uint64_t pbn, uint64_t lba,
                   xm_crypt *out)
{
    *out = (xm_crypt){NULL, 0, 0};
    if (vol >= st->nkeys || st->keys[vol].state == XM_KEY_PLAIN)
        return XM_OK;
    if (raw_io) { /* ciphertext as stored, whatever the slot's state */
        out->raw = 1;
        return XM_OK;
    }
    if (st->keys[vol].state != XM_KEY_UNLOCKED)
        return XM_ELOCKED;
    if (st->keys[vol].tweak == XM_TWEAK_LBA) {
        if (lba == XM_NO_LBA)
            return EINVAL; /* a caller that does not know the logical block: refuse, never guess */
        out->tweak = lba;
    } else {
        out->tweak = pbn;
    }
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c)
        return ENOMEM;
    if (EVP_CIPHER_CTX_copy(c, enc ? st->keys[vol].enc : st->keys[vol].dec) != 1) {
        EVP_CIPHER_CTX_free(c);
        return EIO;
    }
    out->c = c;
    return XM_OK;
}

int xm_crypt_blocks(EVP_CIPHER_CTX *c, uint64_t tweak0, uint64_t nblocks, const uint8_t *in,
                    uint8_t *out)
{
    for (uint64_t i = 0; i < nblocks; i++) {
        uint8_t tweak[16] = {0};
        uint64_t p = tweak0 + i;
        for (int b = 0; b < 8; b++)
            tweak[b] = (uint8_t)(p >> (8 * b));
        int outl = 0;
        /* EVP_CipherInit_ex with no cipher and no key only sets the IV (tweak): about twice as
         * fast as EVP_CipherInit_ex2 in OpenSSL 3.0 (OSSL_CIPHER_PARAM_IV through
         * EVP_CIPHER_CTX_set_params is accepted but ignored by XTS). */
        if (EVP_CipherInit_ex(c, NULL, NULL, NULL, tweak, -1) != 1 ||
            EVP_CipherUpdate(c, out + i * XM_BLOCK_SIZE, &outl, in + i * XM_BLOCK_SIZE,
                             XM_BLOCK_SIZE) != 1 ||
            outl != XM_BLOCK_SIZE)
            return EIO;
    }
    return XM_OK;
}
