/*
 * xm.h - the C core of snapdisk: the extent-map routines and the I/O hot path.
 *
 * Two layers, in the spirit of lmdb.h: flat functions over opaque handles, an int return code
 * (0, a positive errno, or one of the XM_E* codes below) with results in out-parameters, and one
 * xm_strerror().  No Python.h: the Python side reaches this through cffi in API mode, and every
 * call releases the GIL.
 *
 *  1. Pure routines over arrays of xm_extent (xm_plan, xm_insert, xm_extents).  They never
 *     touch LMDB or files; each has a plain-Python twin in snapdisk/extmap_ref.py, and the
 *     differential tests check that both agree.
 *  2. The store: this process's one LMDB environment (LMDB forbids opening an environment twice
 *     in one process), the pool file, a read-transaction pool and the I/O gate (xm_env.c); a
 *     thin key/value API the Python engine builds its metadata operations on (xm_kv.c); the pool
 *     seam, the only code that touches the pool file (xm_pool.c); and the hot path, one call per
 *     NBD request: xm_read, xm_write_inplace, xm_block_status (xm_io.c) and xm_write_row, the
 *     redirect-on-write write (xm_row.c).
 *
 * The on-disk format (databases, keys, values, byte order) is xm_layout.h, the C mirror of
 * src/snapdisk/layout.py; the invariants are described in docs/design.md.
 *
 * Caveats:
 *  - xm_txn handles obey LMDB's rules: a write transaction must be committed or aborted on the
 *    thread that began it, and only one write transaction runs at a time per environment
 *    (mdb_txn_begin blocks; the GIL is released while it waits).
 *  - Values returned through xm_val point into LMDB's map and are valid only until the
 *    transaction ends or the next write in it.
 */
#ifndef SNAPDISK_XM_H
#define SNAPDISK_XM_H

#include <stddef.h>
#include <stdint.h>

#include "xm_layout.h" /* the on-disk format: constants, databases, encodings */

/* cdef-begin: everything down to cdef-end is also read by native/build_ffi.py */

#define XM_OK 0
#define XM_ENOTFOUND -30990       /* key not found */
#define XM_ESLOW -30991           /* the fast path cannot do it: take the general path */
#define XM_ENOVOL -30992          /* volume unknown to the I/O gate */
#define XM_ERANGE -30993          /* I/O past the end of the volume */
#define XM_ECORRUPT -30994        /* a map record failed validation */
#define XM_ESPACE -30995          /* an output array is too small */
#define XM_EBUSY -30996           /* store already open in this process */
#define XM_EMAPFULL -30997        /* LMDB MDB_MAP_FULL: the metadata map is full (xm_set_mapsize) */

/* Cursor operations for xm_cur_get. */
#define XM_FIRST 0
#define XM_LAST 1
#define XM_NEXT 2
#define XM_PREV 3
#define XM_SET_RANGE 4
#define XM_SET_KEY 5
#define XM_GET_CURRENT 6

/* xm_open flags */
#define XM_OPEN_CREATE 1          /* create the environment if missing */
#define XM_OPEN_SYNC_COMMITS 2    /* kept for old callers: commits are synced by default */

/* One run of blocks: in the live map, a record; in a plan, a piece of the request. */
typedef struct {
    uint64_t lba;    /* first logical block */
    uint64_t pbn;    /* first physical block in the pool, or XM_HOLE */
    uint64_t birth;  /* epoch the data was written in (a dead record's death lives elsewhere) */
    uint32_t len;    /* blocks */
    uint32_t flags;  /* XM_F_* */
} xm_extent;

typedef struct {
    const void *data;
    size_t len;
} xm_val;

/* Work counters, for tests that assert on counted work rather than on time. */
typedef struct {
    uint64_t records_read;   /* map records decoded by the hot path and xm_live_overlap */
    uint64_t cursor_steps;   /* cursor positionings (seek or step) by the key/value API */
    uint64_t fast_reads;     /* xm_read calls */
    uint64_t fast_writes;    /* xm_write_inplace calls that wrote */
    uint64_t slow_writes;    /* xm_write_inplace calls answered XM_ESLOW */
    uint64_t redirected_writes; /* xm_write_row calls that allocated */
    uint64_t dropped_runs;   /* superseded runs whose cached pages were dropped (xm_drop.c) */
} xm_stats;

typedef struct xm_store xm_store;
typedef struct xm_txn xm_txn;
typedef struct xm_cur xm_cur;

/* Text for an rc from any function here (static storage). */
const char *xm_strerror(int rc);

/* ---- pure routines --------------------------------------------------------------------- */

/* Cut [lba, lba+nblocks) into runs: mapped runs from ext (sorted, disjoint) and holes;
 * physically contiguous neighbours are merged.  *nout runs written to out (cap entries). */
int xm_plan(const xm_extent *ext, size_t n, uint64_t lba, uint64_t nblocks,
            xm_extent *out, size_t cap, size_t *nout);

/* Overlay nw on the sorted disjoint records old[] (those overlapping or touching it):
 * keep[] receives the records that replace all of old[] (nw included unless it is a hole,
 * merged with contiguous neighbours of equal birth and flags up to max_len); gone[] the parts
 * of old[] that nw covers.  keep needs n+2 entries, gone n. */
int xm_insert(const xm_extent *old, size_t n, const xm_extent *nw, uint32_t max_len,
              xm_extent *keep, size_t *nkeep, xm_extent *gone, size_t *ngone);

/* Block status of [lba, lba+nblocks): alternating allocated runs (pbn 0) and holes
 * (pbn XM_HOLE), whatever the physical layout. */
int xm_extents(const xm_extent *ext, size_t n, uint64_t lba, uint64_t nblocks,
               xm_extent *out, size_t cap, size_t *nout);

/* ---- the store ------------------------------------------------------------------------- */

/* Open (XM_OPEN_CREATE: create) the LMDB environment in dir_path and the pool file.  The
 * environment's page structure is verified first (xm_verify): XM_ECORRUPT if it is damaged. */
int xm_open(const char *dir_path, const char *pool_path, unsigned flags, uint64_t map_bytes,
            xm_store **out);
/* Close everything; no call may be in flight. */
void xm_close(xm_store *st);
/* fdatasync the pool, then sync the LMDB environment: what a FLUSH needs. */
int xm_sync(xm_store *st);
/* Copy and reset-free read of the work counters. */
void xm_get_stats(xm_store *st, xm_stats *out);
/* LMDB's last committed transaction id and the env's page counts, for capacity reports. */
int xm_env_info(xm_store *st, uint64_t *last_txnid, uint64_t *map_pages_used, uint64_t *page_size);
/* The LMDB map size in bytes (the most metadata the store can hold until it is grown). */
uint64_t xm_map_size(xm_store *st);
/* Grow (or shrink) the LMDB map to map_bytes, after XM_EMAPFULL.  LMDB's caveat
 * (mdb_env_set_mapsize): no transaction may be active in this process, so the caller must hold
 * the gate closed (no hot-path call in flight) and have ended every xm_txn; the map is remapped,
 * so every xm_val from before is invalid.  With MDB_WRITEMAP, data.mdb is extended (sparse) to
 * the new size.  Only this process may have the environment open (snapdisk's flock ensures it;
 * another process would see MDB_MAP_RESIZED). */
int xm_set_mapsize(xm_store *st, uint64_t map_bytes);

/* Check the structure of every LMDB page reachable from the current meta page (xm_verify.c):
 * XM_ECORRUPT, with the first damaged page in *bad_pgno, for damage that could crash LMDB's own
 * cursor code.  O(metadata pages); call it before walking a store that may be damaged. */
int xm_verify(xm_store *st, uint64_t *bad_pgno);

/* The I/O gate: the hot path and the Python data path hold it shared; snapshot, rollback, clone,
 * volume config changes and the release of freed blocks hold it exclusive, which waits for
 * in-flight I/O and keeps new I/O out for as long as an O(1) metadata change takes. */
void xm_gate_enter(xm_store *st);
void xm_gate_leave(xm_store *st);
void xm_gate_close(xm_store *st);
void xm_gate_open(xm_store *st);

/* Tell the hot path about a volume (call with the gate closed): its size in bytes, the epoch of
 * its newest snapshot (0: none) and whether it is writable. */
int xm_vol_config(xm_store *st, uint32_t vol, uint64_t size_bytes, uint64_t max_snap, int writable);
int xm_vol_forget(xm_store *st, uint32_t vol);

/* ---- key/value API over the store's databases ------------------------------------------- */

/* write: 1 a write transaction; 0 a read one, which first applies the group-commit overlay
 * (xm_batch.c) so that it sees every write that completed; 2 a read of the catalog only
 * (volumes, snapshots, names, config), which leaves the overlay alone: the map's records may
 * then lag behind the pending writes (a periodic reader must not force a batch). */
int xm_txn_begin(xm_store *st, int write, xm_txn **out);
int xm_txn_commit(xm_txn *txn);
void xm_txn_abort(xm_txn *txn);
int xm_get(xm_txn *txn, int db, const void *key, size_t klen, xm_val *val);
int xm_put(xm_txn *txn, int db, const void *key, size_t klen, const void *val, size_t vlen);
int xm_del(xm_txn *txn, int db, const void *key, size_t klen);
/* Remove every record of a database whose key starts with prefix; *count gets how many. */
int xm_del_prefix(xm_txn *txn, int db, const void *prefix, size_t plen, uint64_t *count);
int xm_cur_open(xm_txn *txn, int db, xm_cur **out);
void xm_cur_close(xm_cur *cur);
/* Position the cursor (op: XM_FIRST...); key is read for XM_SET_RANGE/XM_SET_KEY. */
int xm_cur_get(xm_cur *cur, int op, const void *key, size_t klen, xm_val *k, xm_val *v);
/* Delete the record under the cursor. */
int xm_cur_del(xm_cur *cur);

/* Live records of vol overlapping [lba-1, lba+nblocks] (touching neighbours included, for
 * merging), in order, decoded.  XM_ESPACE if more than cap. */
int xm_live_overlap(xm_txn *txn, uint32_t vol, uint64_t lba, uint64_t nblocks,
                    xm_extent *out, size_t cap, size_t *nout);

/* ---- the pool seam (xm_pool.c) ---------------------------------------------------------
 *
 * The only code that touches the pool file: every C path and Python's Pool go through these.
 * Addresses are blocks (pbn) plus a byte offset into the first one; the file is accessed in whole
 * blocks only (a partial block is read whole, or read, patched and written whole), so a
 * block-granular transform (a cipher, with the logical block as tweak) lives in one place. */

/* nbytes from block pbn at offset_in_block into buf; never-written space reads as zeros.
 * vol is the volume whose data the blocks hold: an encrypted volume's blocks are decrypted with
 * its key (XM_ELOCKED if it is locked); see xm_crypt.c.  lba is the logical block number block
 * pbn holds for vol (block pbn+i holds lba+i): the XTS tweak of volumes in lba mode; XM_NO_LBA
 * where the caller has none (raw or plain access only: EINVAL for an lba-mode volume).  Call
 * with the gate held. */
int xm_pool_read(xm_store *st, uint32_t vol, uint64_t pbn, uint64_t lba, uint64_t offset_in_block,
                 uint64_t nbytes, uint8_t *buf);
/* nbytes from buf to block pbn at offset_in_block; partial blocks are read-modify-written
 * (decrypted, patched, encrypted).  A full filesystem is ENOSPC (EDQUOT too). */
int xm_pool_write(xm_store *st, uint32_t vol, uint64_t pbn, uint64_t lba,
                  uint64_t offset_in_block, uint64_t nbytes, const uint8_t *buf);
/* Give nblocks from pbn back to the filesystem (they read as zeros after).  A filesystem without
 * hole punching keeps the space: that is success. */
int xm_pool_punch(xm_store *st, uint64_t pbn, uint64_t nblocks);
/* The punch guard.  A freed block sits in PENDING until a FLUSH's sync, which then makes it FREE
 * (allocator.release_pending), and a write may take it at once; a punch of it after that would
 * zero the new data.  Whoever frees blocks and punches them after the commit holds the guard
 * from before that commit to after the punch (xm_punch_hold, xm_punch_release), and the move
 * from PENDING to FREE first waits until nobody holds it (xm_punch_wait): a move that saw the
 * commit's seq started after the hold.  xm_punch_holders is for tests. */
void xm_punch_hold(xm_store *st);
void xm_punch_release(xm_store *st);
void xm_punch_wait(xm_store *st);
int xm_punch_holders(xm_store *st);
/* Bytes the pool file occupies on its filesystem (st_blocks * 512). */
int xm_pool_size_on_disk(xm_store *st, uint64_t *out);

/* ---- the hot path (live volumes) --------------------------------------------------------- */

/* Read [offset, offset+length) of vol's live view into buf. */
int xm_read(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, uint8_t *buf);
/* Write in place when every block of the range is mapped, born after vol's newest snapshot and
 * not shared; else write nothing and return XM_ESLOW.  No map change, no LMDB writer lock. */
int xm_write_inplace(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf);
/* Write [offset, offset+length) of vol's live view with redirect-on-write, group-committed
 * (xm_batch.c): blocks xm_write_inplace could write (or in the overlay) are written in place,
 * the others go to newly reserved blocks and their map change to the overlay; a later batch
 * makes the covered records dead records for the snapshots that hold them, or releases the
 * SHARED ones no snapshot holds (REFS).
 * XM_ESLOW or ENOSPC (pool or filesystem full), with no map change and nothing written over
 * the volume's blocks, when the request is huge or spans too many records or the free space
 * is too fragmented: the general (Python) path handles those.  Every such
 * decision, and the commit, come before the first in-place write. */
int xm_write_row(xm_store *st, uint32_t vol, uint64_t offset, uint64_t length, const uint8_t *buf);
/* Block status of [lba, lba+nblocks) of the live view, at most cap runs. */
int xm_block_status(xm_store *st, uint32_t vol, uint64_t lba, uint64_t nblocks,
                    xm_extent *out, size_t cap, size_t *nout);

/* ---- a full filesystem under the store (xm_space.c) ------------------------------------- */

#define XM_SPACE_GROW 1 /* a write transaction that allocates: a redirected write */
#define XM_SPACE_ANY 0  /* any other write transaction (it mostly frees space) */

typedef struct {
    uint64_t fs_free_bytes;       /* free space of the metadata's filesystem (statvfs) */
    uint64_t meta_used_bytes;     /* data.mdb up to LMDB's last used page */
    uint64_t meta_reserved_bytes; /* data.mdb given real blocks (at least meta_used_bytes) */
    uint64_t ahead_bytes;         /* the headroom kept past the last used page */
    int low;                      /* headroom under ahead/2: allocating writes refused */
    int no_fallocate;             /* the filesystem has no fallocate: free space checked */
} xm_space;

/* XM_OK if a write transaction of kind `what` may begin, ENOSPC if the metadata has too little
 * room left on the filesystem (it tries to take more first). */
int xm_space_check(xm_store *st, int what);
int xm_space_info(xm_store *st, xm_space *out);
/* ---- encrypted volumes (xm_crypt.c) -------------------------------------------------------
 * A volume's key slot: PLAIN (no cipher), LOCKED (encrypted, no key: its pool I/O returns
 * XM_ELOCKED) or UNLOCKED (AES-256-XTS, 64-byte key, 4 KiB data units, tweak below).  Call
 * with the gate closed, as xm_vol_config.  The first xm_vol_set_key sets
 * prctl(PR_SET_DUMPABLE, 0). */
#define XM_ELOCKED -30998         /* the volume is encrypted and its key is not loaded */
#define XM_KEY_PLAIN 0
#define XM_KEY_LOCKED 1
#define XM_KEY_UNLOCKED 2
#define XM_KEY_BYTES 64           /* AES-256-XTS: two 256-bit keys */
int xm_vol_set_key(xm_store *st, uint32_t vol, const uint8_t *key, size_t keylen);
/* Wipe vol's key (if any) and mark it LOCKED. */
int xm_vol_lock(xm_store *st, uint32_t vol);
/* Wipe vol's key (if any) and mark it PLAIN. */
int xm_vol_clear_key(xm_store *st, uint32_t vol);
/* encrypted: LOCKED unless already LOCKED or UNLOCKED (a loaded key stays); else PLAIN. */
int xm_vol_mark_encrypted(xm_store *st, uint32_t vol, int encrypted);
/* vol's slot state; takes the gate shared (do not call it with the gate held). */
int xm_vol_key_state(xm_store *st, uint32_t vol);
/* ---- raw send of encrypted volumes (xm_crypt.c): tweak mode, raw I/O ----------------------
 * vol's XTS tweak: XM_TWEAK_LBA (the logical block number; volumes encrypted since format 3)
 * or XM_TWEAK_PBN (the physical block number; legacy).  Set before the key (the gate closed);
 * kept across lock and unlock, reset to PBN by xm_vol_clear_key.  xm_raw_io(1) puts the CALLING
 * THREAD in raw mode until xm_raw_io(0): its pool I/O of encrypted volumes moves ciphertext as
 * stored (no cipher, a locked volume too), whole blocks only (EINVAL otherwise).  For send,
 * backup, receive and restore only; never an NBD thread. */
#define XM_TWEAK_PBN 0
#define XM_TWEAK_LBA 1
#define XM_NO_LBA 18446744073709551615ULL /* no logical block: UINT64_MAX */
int xm_vol_set_tweak(xm_store *st, uint32_t vol, int mode);
void xm_raw_io(int on);
/* ---- bulk metadata walks (xm_bulk.c) ----------------------------------------------------
 *
 * Each call is one bounded write transaction (at most `limit` map records), committed before it
 * returns; *ndone < limit means the walk is complete.  Blocks freed go to PENDING; merged freed
 * runs of at least punch_min blocks are punched from the pool after the commit.  The driver
 * (snapdisk/bulk.py) marks the work first and finishes it at open. */

/* Drop the dead records of vol with death_lo <= death <= death_hi and birth_lo <= birth <=
 * birth_hi (a deleted snapshot's window), releasing their blocks. */
int xm_bulk_drop_window(xm_store *st, uint32_t vol, uint64_t death_lo, uint64_t death_hi,
                        uint64_t birth_lo, uint64_t birth_hi, uint64_t limit, uint64_t punch_min,
                        uint64_t *ndone);
/* Release and remove live records of vol (and their LIVEBIRTH entries), then dead ones (and
 * their DEADIDX entries). */
int xm_bulk_drop_volume(xm_store *st, uint32_t vol, uint64_t limit, uint64_t punch_min,
                        uint64_t *ndone);
/* Delete keys of db in [lo, hi) (byte order). */
int xm_bulk_del_range(xm_store *st, int db, const void *lo, size_t lolen, const void *hi,
                      size_t hilen, uint64_t limit, uint64_t *ndone);
/* Key/value operations the walks above have done in this process (counted-work tests). */
uint64_t xm_bulk_ops(void);
/* Rollback of vol to snapshot epoch (xm_bulk_rb.c).  The plan: the merged ranges starting at
 * or above pos that differ from the snapshot (each as lba = start, pbn = end, birth = the number
 * of records starting in it: its weight), the snapshot's records at or above pos to copy back
 * (sorted), and the total weight.  *ranges and *targets are malloc'd: xm_bulk_free them. */
int xm_bulk_rollback_plan(xm_store *st, uint32_t vol, uint64_t epoch, int birth_indexed,
                          uint64_t pos, xm_extent **ranges, size_t *nr, xm_extent **targets,
                          size_t *nt, uint64_t *weight);
void xm_bulk_free(void *p);
/* One step of a clone (xm_bulk_clone.c): snapshot epoch of src over blocks [lo, hi) copied into
 * dst (SHARED, REFS raised), src's still-live records there marked SHARED, hi stored (LE u64)
 * under META pos_key; one write transaction.  *nrecs: the view's records. */
int xm_bulk_clone_step(xm_store *st, uint32_t src, uint64_t epoch, uint32_t dst, uint64_t lo,
                       uint64_t hi, const void *pos_key, size_t pklen, uint64_t *nrecs);
/* One chunk of the plan from ranges[*k] and targets[*ti] on (ranges while their weight is under
 * limit, at least one): unmap them, copy their targets in (born now, SHARED), and store the
 * position (the last range's end, LE u64) under META pos_key, in one write transaction; then
 * *k and *ti move past the chunk and *ndone is its weight (0: the plan is done). */
int xm_bulk_rollback_apply(xm_store *st, uint32_t vol, const xm_extent *ranges, size_t nr,
                           const xm_extent *targets, size_t nt, size_t *k, size_t *ti,
                           uint64_t limit, const void *pos_key, size_t pklen, uint64_t punch_min,
                           uint64_t *ndone);
/* ---- group commit (xm_batch.c, issue 9) ---- */
/* Apply the overlay of redirected writes now, in one synced transaction (data fdatasync()ed
 * first).  xm_sync does this too; every other write transaction applies it first. */
int xm_batch_commit(xm_store *st);
/* The committer: a batch is due when its oldest entry is interval_us old (0: only on demand) or
 * the overlay holds max_blocks / 2; max_blocks bounds the overlay. */
int xm_batch_config(xm_store *st, uint64_t interval_us, uint32_t max_blocks);
/* Blocks in the overlay, not yet in LMDB. */
uint64_t xm_batch_pending(xm_store *st);
/* The committer's last failure (then cleared); 0 if none. */
int xm_batch_error(xm_store *st);
#define XM_OPEN_UNSAFE_NOSYNC 4   /* MDB_NOSYNC: commits reach the disk only at xm_sync */
/* fdatasync the pool only: the Python write path calls it before committing a map change that
 * points at data it just wrote (data before map). */
int xm_pool_datasync(xm_store *st);
/* ---- durability points (issue 9, perf: MDB_NOMETASYNC) ---- */
/* Make every committed transaction durable (mdb_env_sync(env, 1), skipped when no commit
 * happened since the last one).  Commits are MDB_NOMETASYNC: a system crash may undo the last
 * one until this (or the next commit) runs; see docs/design.md, "Durability". */
int xm_env_sync(xm_store *st);
/* Commit without the durability sync that xm_txn_commit does: the caller calls xm_env_sync
 * before it tells anyone the change happened (snapshot create: after reopening the I/O gate). */
int xm_txn_commit_deferred(xm_txn *txn);
/* ---- the read hot path in one call (issue 9 item 4) ---- */
/* One NBD connection's request count and revocation flag (connections.py's Connection.inflight
 * and generation check, in C).  Allocated by Python (ffi.new), zeroed. */
typedef struct {
    uint32_t inflight;
    uint32_t revoked;
    uint32_t row_first; /* xm_conn_write's guess: the last write redirected (no lock: a hint) */
} xm_conn;
#define XM_EREVOKED -30970        /* the connection was revoked (a forced rollback): reconnect */
/* xm_read, counted in flight on c and refused (XM_EREVOKED) once c is revoked.  The count
 * comes before the check, and xm_conn_revoke's store before the reader of xm_conn_inflight
 * looks (both sequentially consistent): either the revoker sees this read in flight and waits
 * for it, or this read sees the revocation. */
int xm_conn_read(xm_store *st, xm_conn *c, uint32_t vol, uint64_t offset, uint64_t length,
                 uint8_t *buf);
/* The write hot path in one call, counted and refused like xm_conn_read: xm_write_inplace,
 * and where it declines and row is set, xm_write_row.  XM_ESLOW, with nothing written, when
 * the general (Python) path must do the write (what xm_write_row declines, ENOSPC included:
 * that path reclaims or answers ENOSPC).  row = 0 sends every redirect there (the model test's
 * Python write path).  A redirected write used to be two Python-level calls and two map
 * lookups after the in-place one declined: ~3 us of the request thread's ~20 (issue 9).
 * After a write that redirected, the next one goes straight to xm_write_row (which writes
 * in place what may be): right after a snapshot nearly every write redirects, and the
 * in-place attempt's map lookup was wasted; the first write that redirects nothing, or that
 * xm_write_row declines, switches back. */
int xm_conn_write(xm_store *st, xm_conn *c, uint32_t vol, uint64_t offset, uint64_t length,
                  const uint8_t *buf, int row);
void xm_conn_revoke(xm_conn *c);
uint32_t xm_conn_inflight(xm_conn *c);
/* ---- snapshot create without the batch (issue 9 item 3) ---- */
/* Around a snapshot create, on its thread: the next write transaction this thread begins
 * leaves the group-commit overlay alone (its entries survive the snapshot; docs/design.md
 * "Group commit"), and until xm_batch_snap_end the committer starts no batch and stops the
 * one in progress after its current chunk. */
void xm_batch_snap_begin(xm_store *st);
void xm_batch_snap_end(xm_store *st);
/* Inside the snapshot's transaction: the blocks vol's pending entries will add to its
 * live_blocks (holes they fill), for the snapshot's referenced size. */
uint64_t xm_batch_vol_growth(xm_store *st, uint32_t vol);

/* ---- backups: many pieces of a snapshot in one call (issue 13, xm_multiread.c) ---- */
/* Snapshot epoch of vol at n block-aligned pieces (byte offsets offs[i], lengths lens[i],
 * sorted, not overlapping), back to back into buf (the sum of lens; holes read as zeros): one
 * view of the pieces' span, one pool read per record-piece overlap.  EINVAL for unaligned or
 * unsorted pieces.  Call with the gate held shared. */
int xm_snap_readv(xm_store *st, uint32_t vol, uint64_t epoch, const uint64_t *offs,
                  const uint64_t *lens, size_t n, uint8_t *buf);

/* cdef-end */

#endif
