/*
 * xm_layout.h - the on-disk format of a snapdisk store, as C sees it.
 *
 * The C mirror of src/snapdisk/layout.py, which owns the format and whose docstring is the table
 * of databases and encodings.  Everything between the cdef markers is also read by cffi (see
 * native/build_ffi.py), so Python takes these numbers from the compiler and never from a copy.
 *
 * Byte order, stated once:
 *   - KEYS are BIG-endian, so that LMDB's byte-wise key order is numeric order (a cursor walks a
 *     volume's records by block number).
 *   - VALUES are LITTLE-endian, packed, no padding (Python: struct "<...").
 * Both are encoded and decoded byte by byte through the helpers below, never by memcpy of a host
 * struct, so the format is the same on any host.  The value structs are the decoded, host-order
 * form; the _Static_asserts pin their encoded sizes so that a field added to a struct without
 * the format noticing fails to compile.
 *
 * Databases (LMDB named sub-databases), keys -> values:
 *   META       name (ASCII)                         -> per key, see XM_META_* below
 *   VOLUMES    vol:u32                              -> JSON (volume config; Python only)
 *   VOLSTATE   vol:u32                              -> xm_volstate (40 bytes)
 *   NAMES      'v'|'s' name...                      -> vol:u32be / ... (Python only)
 *   SNAPS      vol:u32 epoch:u64                    -> JSON (Python only)
 *   LIVE       vol:u32 lba:u64                      -> xm_rec (len flags pbn birth)
 *   LIVEBIRTH  vol:u32 birth:u64 lba:u64            -> len:u32
 *   DEAD       vol:u32 lba:u64 birth:u64            -> xm_rec (len flags pbn death)
 *   DEADIDX    vol:u32 death:u64 birth:u64 lba:u64  -> len:u32
 *   REFS       pbn:u64                              -> len:u64 refs:u64
 *   FREE       pbn:u64                              -> len:u64
 *   PENDING    seq:u64 pbn:u64                      -> len:u64
 *   COUNTERS   vol:u32 death:u64 birth:u64          -> blocks:u64
 *
 * Adding a database: a new XM_DB_* number (the next one), XM_DB_COUNT one up, its name appended
 * to XM_DB_NAMES.  That is the whole C edit: xm_open opens the table, creates a database an
 * older store lacks, and XM_DB_MAX leaves LMDB room for the coming ones (keys, policies, jobs,
 * backup indexes).  Never renumber or rename one: numbers are how Python names them, names are
 * how LMDB finds them in existing stores.
 */
#ifndef SNAPDISK_XM_LAYOUT_H
#define SNAPDISK_XM_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin: everything down to cdef-end is also read by native/build_ffi.py */

#define XM_FORMAT_VERSION 3       /* on-disk format version this build writes (layout.py: MIGRATIONS) */
#define XM_BLOCK_SIZE 4096        /* bytes per map block */
#define XM_MAX_EXTENT 1024        /* longest map record in blocks (bounds snapshot-read scans) */
#define XM_HOLE 18446744073709551615ULL /* pbn of a hole in a plan: UINT64_MAX (never stored) */
#define XM_INFINITY 18446744073709551615ULL /* death epoch of a live record: UINT64_MAX */

#define XM_F_SHARED 1             /* record flag: its blocks may have other holders (see REFS) */

#define XM_VS_BIRTH_INDEXED 1     /* VOLSTATE flag: LIVEBIRTH may hold records of the volume */
#define XM_VS_SHARED 2            /* VOLSTATE flag: some record was copied by rollback or clone */
#define XM_VS_ENCRYPTED 4         /* VOLSTATE flag: the volume's blocks are encrypted (xm_crypt.c) */

/* Databases the key/value API addresses by number (the order of XM_DB_NAMES). */
#define XM_DB_META 0
#define XM_DB_VOLUMES 1
#define XM_DB_VOLSTATE 2
#define XM_DB_NAMES 3
#define XM_DB_SNAPS 4
#define XM_DB_LIVE 5
#define XM_DB_LIVEBIRTH 6
#define XM_DB_DEAD 7
#define XM_DB_DEADIDX 8
#define XM_DB_REFS 9
#define XM_DB_FREE 10
#define XM_DB_PENDING 11
#define XM_DB_COUNTERS 12
#define XM_DB_COUNT 13            /* databases of this format */
#define XM_DB_MAX 32              /* LMDB's maxdbs: room for coming databases */

/* Encoded sizes in bytes. */
#define XM_VOL_KEY_LEN 4          /* vol:u32 (VOLSTATE, VOLUMES) */
#define XM_PBN_KEY_LEN 8          /* pbn:u64 (FREE, REFS) */
#define XM_LIVE_KEY_LEN 12        /* vol:u32 lba:u64 (LIVE; SNAPS: vol epoch) */
#define XM_TRIPLE_KEY_LEN 20      /* vol:u32 a:u64 b:u64 (DEAD, LIVEBIRTH, COUNTERS) */
#define XM_DEADIDX_KEY_LEN 28     /* vol:u32 death:u64 birth:u64 lba:u64 */
#define XM_REC_LEN 24             /* xm_rec: len:u32 flags:u32 pbn:u64 birth-or-death:u64 */
#define XM_VOLSTATE_LEN 40        /* xm_volstate */
#define XM_U32_LEN 4              /* LIVEBIRTH, DEADIDX values */
#define XM_U64_LEN 8              /* FREE, PENDING, COUNTERS values; META pool_blocks, seq */
#define XM_U64X2_LEN 16           /* REFS values; META alloc, blocks */

/* The name of database db (static storage), NULL if db is not one. */
const char *xm_db_name(int db);

/* cdef-end */

/* LMDB names of the databases, in XM_DB_* order. */
#define XM_DB_NAMES_INIT                                                                  \
    {                                                                                     \
        "meta", "volumes", "volstate", "names", "snaps", "live", "livebirth", "dead",     \
            "deadidx", "refs", "free", "pending", "counters",                             \
    }

/* META keys the C core reads or writes (values little-endian). */
#define XM_META_ALLOC "alloc"             /* hwm:u64 hint:u64: high-water mark, next-fit hint */
#define XM_META_BLOCKS "blocks"           /* free:u64 pending:u64 block totals */
#define XM_META_POOL_BLOCKS "pool_blocks" /* capacity:u64 in blocks */

/* A LIVE or DEAD value, decoded.  `epoch` is the birth of a live record, the death of a dead one
 * (a dead record's birth is in its key). */
typedef struct {
    uint32_t len;
    uint32_t flags;
    uint64_t pbn;
    uint64_t epoch;
} xm_rec;

/* A VOLSTATE value, decoded: the hot, fixed-size part of a volume's record. */
typedef struct {
    uint64_t size_bytes, epoch, max_snap, live_blocks;
    uint32_t nsnaps, flags;
} xm_volstate;

/* The encoded sizes are the sums of the fields; these structs also happen to have no padding,
 * which the asserts check so that nobody is tempted to memcpy them. */
_Static_assert(sizeof(xm_rec) == XM_REC_LEN, "xm_rec is 24 bytes");
_Static_assert(sizeof(xm_volstate) == XM_VOLSTATE_LEN, "xm_volstate is 40 bytes");
_Static_assert(XM_DB_COUNT <= XM_DB_MAX, "raise XM_DB_MAX");
_Static_assert(XM_TRIPLE_KEY_LEN == 4 + 8 + 8 && XM_DEADIDX_KEY_LEN == 4 + 3 * 8, "key sizes");

/* ---- byte order helpers ---------------------------------------------------------------- */

static inline void xm_put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static inline void xm_put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static inline uint32_t xm_get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t xm_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline void xm_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void xm_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t xm_get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t xm_get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ---- keys ------------------------------------------------------------------------------ */

/* vol:u32 a:u64 (LIVE: a = lba). */
static inline void xm_key_live(uint8_t k[XM_LIVE_KEY_LEN], uint32_t vol, uint64_t a)
{
    xm_put_be32(k, vol);
    xm_put_be64(k + 4, a);
}

/* vol:u32 a:u64 b:u64 (DEAD: lba birth; LIVEBIRTH: birth lba; COUNTERS: death birth). */
static inline void xm_key_triple(uint8_t k[XM_TRIPLE_KEY_LEN], uint32_t vol, uint64_t a, uint64_t b)
{
    xm_put_be32(k, vol);
    xm_put_be64(k + 4, a);
    xm_put_be64(k + 12, b);
}

static inline void xm_key_deadidx(uint8_t k[XM_DEADIDX_KEY_LEN], uint32_t vol, uint64_t death,
                                  uint64_t birth, uint64_t lba)
{
    xm_key_triple(k, vol, death, birth);
    xm_put_be64(k + 20, lba);
}

/* ---- values ---------------------------------------------------------------------------- */

static inline void xm_rec_encode(uint8_t p[XM_REC_LEN], const xm_rec *r)
{
    xm_put_le32(p, r->len);
    xm_put_le32(p + 4, r->flags);
    xm_put_le64(p + 8, r->pbn);
    xm_put_le64(p + 16, r->epoch);
}

/* 0, or -1 if the bytes cannot be a record (the caller answers XM_ECORRUPT).  Checks what every
 * reader relies on: the size, a length in 1..XM_MAX_EXTENT, and a pbn range whose byte offset
 * cannot overflow a 64-bit file offset. */
static inline int xm_rec_decode(const void *data, size_t len, xm_rec *r)
{
    const uint8_t *p = data;
    if (len != XM_REC_LEN)
        return -1;
    r->len = xm_get_le32(p);
    r->flags = xm_get_le32(p + 4);
    r->pbn = xm_get_le64(p + 8);
    r->epoch = xm_get_le64(p + 16);
    if (r->len == 0 || r->len > XM_MAX_EXTENT || r->pbn > (UINT64_MAX >> 13) - r->len)
        return -1;
    return 0;
}

static inline void xm_volstate_encode(uint8_t p[XM_VOLSTATE_LEN], const xm_volstate *v)
{
    xm_put_le64(p, v->size_bytes);
    xm_put_le64(p + 8, v->epoch);
    xm_put_le64(p + 16, v->max_snap);
    xm_put_le64(p + 24, v->live_blocks);
    xm_put_le32(p + 32, v->nsnaps);
    xm_put_le32(p + 36, v->flags);
}

static inline int xm_volstate_decode(const void *data, size_t len, xm_volstate *v)
{
    const uint8_t *p = data;
    if (len != XM_VOLSTATE_LEN)
        return -1;
    v->size_bytes = xm_get_le64(p);
    v->epoch = xm_get_le64(p + 8);
    v->max_snap = xm_get_le64(p + 16);
    v->live_blocks = xm_get_le64(p + 24);
    v->nsnaps = xm_get_le32(p + 32);
    v->flags = xm_get_le32(p + 36);
    return 0;
}

#endif
