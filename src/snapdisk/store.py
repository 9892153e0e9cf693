"""The store directory: what is in it, how it is made and opened, and who may write it.

    STORE/
      meta/data.mdb, meta/lock.mdb   LMDB environment: catalog and block maps (layout.py)
      pool.dat                       data pool: block N at byte N*4096, sparse
      lock                           flock()ed exclusively by the one process that writes
      nbd.sock, control.sock         the server's sockets (serve)
      server.pid                     the server's pid (serve)

One process at a time opens a store for writing (the server, or a CLI command when no server
runs); a second one gets StoreLocked.  Within that process the C core owns the LMDB environment
(native/xm_store.c); nothing else opens it.  The META records are listed in layout.py.

Creation is atomic (issue 10 item 5): `create` takes the lock first, so of two racing inits
one builds the store and the other gets StoreLocked, or AlreadyExists once the first is done.
The new environment and pool are built in STORE/.init and renamed into place, `meta/` last:
a store exists exactly when meta/data.mdb does.  A failed init leaves nothing behind: what
it made is removed (a directory only if empty: another init may have won it meanwhile), and
an existing directory keeps its mode (it is chmod-ed 0700 only on success).

Format migration: a store of an older format is upgraded on open, in one write transaction
(all of it or none), by the functions of MIGRATIONS in turn; a newer one is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import errors, layout
from .layout import BLOCK_SIZE, DB_META, DB_VOLUMES, FORMAT_VERSION
from .native import NativeStore, Txn

DEFAULT_MAP_BYTES = 64 << 30
MIN_MAP_BYTES = 1 << 20
MIN_POOL_BYTES = BLOCK_SIZE * 16

# The default pool size (issue 10 item 1): 90 % of the filesystem's free space at init, less a
# reserve for the metadata, which grows on the same filesystem (data.mdb: about 1/1000 of the
# data for unfragmented volumes, much more with many snapshots of scattered writes; its next
# pages are given blocks ahead of use, native/xm_space.c).  The reserve is 1/32 of the free
# space, at least 8 MiB and at most 4 GiB.  The rest stays free for the filesystem's other users.
# A larger pool may be asked for (thin provisioning: the pool file is sparse); init then warns
# that writes may fail with ENOSPC before the pool is full.
DEFAULT_POOL_FRACTION = 0.9
META_RESERVE_MIN = 8 << 20
META_RESERVE_MAX = 4 << 30


def default_pool_bytes(free: int) -> int:
    """The default pool size on a filesystem with `free` bytes free (see above)."""
    reserve = min(max(free // 32, META_RESERVE_MIN), META_RESERVE_MAX)
    return max(0, int(free * DEFAULT_POOL_FRACTION) - reserve) // BLOCK_SIZE * BLOCK_SIZE


def _free_space(path: str) -> int:
    """Free bytes of the filesystem path is (or would be created) on."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def pool_warnings(path: str, pool_bytes: int) -> list[str]:
    """What `init` warns about a pool of pool_bytes in store `path` (before it is made)."""
    p = os.path.abspath(path)
    free = _free_space(os.path.join(p, "pool.dat") if os.path.lexists(
        os.path.join(p, "pool.dat")) else p)
    if pool_bytes <= default_pool_bytes(free):
        return []
    return [f"the pool ({pool_bytes} bytes) is larger than {int(DEFAULT_POOL_FRACTION * 100)}% "
            f"of the filesystem's free space ({free} bytes) less the metadata's reserve: "
            "writes will fail with ENOSPC when the filesystem is full, before the pool is"]


@dataclass
class StoreConfig:
    """Options fixed at `init` (and some changeable later): META `config`, JSON."""

    pool_bytes: int | None = None  # None: default_pool_bytes of the free space at init
    # Durability (issue 9): LMDB commits are synced and redirected writes group-committed, so a
    # power cut loses only unflushed writes.  sync_commits is kept for old configs (commits are
    # synced whatever it says); unsafe_nosync opts into MDB_NOSYNC: a power cut or kernel
    # crash may then lose commits since the last FLUSH and damage the environment (LMDB's
    # caveat), with control operations that already replied.  Written only when set.
    sync_commits: bool = False
    unsafe_nosync: bool = False
    manual_snapshot_quota: int = 256
    auto_snapshot_quota: int = 256
    map_bytes: int = DEFAULT_MAP_BYTES  # LMDB map size: the most metadata the store can hold
    timezone: str | None = None  # IANA zone of policy slots; None: the system's local zone
    policies: dict[str, Any] = field(default_factory=dict)  # name -> schedule.Policy.to_dict()
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = ("pool_bytes", "sync_commits", "manual_snapshot_quota", "auto_snapshot_quota",
             "map_bytes", "timezone", "policies")

    def to_json(self) -> bytes:
        # timezone, policies and unsafe_nosync are optional keys (absent: the defaults), so a
        # store that uses none of them keeps format 2's exact bytes.
        d = {k: getattr(self, k) for k in self.KNOWN}
        if d["timezone"] is None:
            del d["timezone"]
        if not d["policies"]:
            del d["policies"]
        unsafe = {"unsafe_nosync": True} if self.unsafe_nosync else {}
        return layout.encode_json(d | unsafe | self.extra)

    @classmethod
    def from_json(cls, raw: bytes | None) -> StoreConfig:
        what = "store config"
        d = layout.decode_json(raw, what)
        f = layout.field
        known = {"pool_bytes": f(d, "pool_bytes", int, what),
                 "sync_commits": f(d, "sync_commits", bool, what, False),
                 "manual_snapshot_quota": f(d, "manual_snapshot_quota", int, what, 256),
                 "auto_snapshot_quota": f(d, "auto_snapshot_quota", int, what, 256),
                 "map_bytes": f(d, "map_bytes", int, what, DEFAULT_MAP_BYTES),
                 "timezone": f(d, "timezone", (str, type(None)), what, None),
                 "policies": f(d, "policies", dict, what, {}),
                 "unsafe_nosync": f(d, "unsafe_nosync", bool, what, False)}
        return cls(**known, extra={k: v for k, v in d.items()
                                   if k not in cls.KNOWN and k != "unsafe_nosync"})

    def validate(self) -> None:
        if not isinstance(self.pool_bytes, int) or self.pool_bytes < MIN_POOL_BYTES:
            raise errors.InvalidSize(f"pool size {self.pool_bytes} is too small "
                                     f"(at least {MIN_POOL_BYTES} bytes)")
        if (not isinstance(self.map_bytes, int) or self.map_bytes < MIN_MAP_BYTES
                or self.map_bytes % BLOCK_SIZE):
            raise errors.InvalidSize(f"map size {self.map_bytes}: a multiple of {BLOCK_SIZE} "
                                     f"bytes, at least {MIN_MAP_BYTES}")


# ---- format migrations ----------------------------------------------------------------------

def _migrate_1_to_2(t: Txn) -> None:
    """Format 2: `config` gains map_bytes (the map size format 1 always used), VOLUMES records
    gain encryption (null: not encrypted)."""
    config = layout.decode_json(t.get(DB_META, layout.META_CONFIG), "store config")
    config.setdefault("map_bytes", DEFAULT_MAP_BYTES)
    t.put(DB_META, layout.META_CONFIG, layout.encode_json(config))
    for k, v in list(t.scan(DB_VOLUMES, b"")):
        rec = layout.decode_json(v, f"volume {layout.parse_vol_key(k)} record")
        rec.setdefault("encryption", None)
        t.put(DB_VOLUMES, k, layout.encode_json(rec))


def _migrate_2_to_3(t: Txn) -> None:
    """Format 3: new encrypted volumes use the logical block number as XTS tweak (key record
    "tweak": "lba"; docs/encryption.md).  Existing records have no "tweak" and keep the pbn
    tweak, so nothing changes; the version alone keeps a format-2 snapdisk, which would
    decrypt an lba volume with the pbn (garbage), from opening the store."""
    del t


# MIGRATIONS[v] upgrades a store of format v to v + 1, inside the caller's transaction.
MIGRATIONS: dict[int, Callable[[Txn], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def migrate(t: Txn, version: int, path: str) -> None:
    """Upgrade from `version` to FORMAT_VERSION in t (FormatError if there is no way)."""
    if version > FORMAT_VERSION or any(v not in MIGRATIONS for v in range(version, FORMAT_VERSION)):
        raise errors.FormatError(
            f"{path}: on-disk format {version}, this snapdisk reads {FORMAT_VERSION}"
            + (" (and migrates from 1)" if version < FORMAT_VERSION else ""))
    for v in range(version, FORMAT_VERSION):
        MIGRATIONS[v](t)
    t.put(DB_META, layout.META_FORMAT, layout.encode_u32(FORMAT_VERSION))


class StoreDir:
    """An open store: its paths, its lock, its LMDB environment and pool file."""

    def __init__(self, path: str, native: NativeStore, lock_fd: int, config: StoreConfig):
        self.path = path
        self.native = native
        self._lock_fd = lock_fd
        self.config = config

    @staticmethod
    def paths(path: str) -> dict[str, str]:
        return {name: os.path.join(path, name) for name in
                ("meta", "pool.dat", "lock", "nbd.sock", "control.sock", "server.pid", ".init")}

    @classmethod
    def create(cls, path: str, config: StoreConfig | None = None) -> StoreDir:
        config = config or StoreConfig()
        path = os.path.abspath(path)
        p = cls.paths(path)
        if os.path.exists(os.path.join(p["meta"], "data.mdb")):  # checked again under the lock
            raise errors.AlreadyExists(f"a store already exists in {path}")
        try:  # not isdir() then makedirs(): racing inits would fail on EEXIST
            os.makedirs(path, mode=0o700)
            made_dir = True
        except FileExistsError:
            made_dir = False
        made_lock = not os.path.exists(p["lock"])
        try:
            lock_fd = cls._lock(p["lock"])
        except BaseException:
            if made_dir:  # the winner of a race may be building its store in it: rmdir only
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        built = False
        # A pool.dat already there (a symlink to a file on another filesystem, say) is used
        # in place and never removed.
        pool_given = os.path.lexists(p["pool.dat"])
        try:
            if os.path.exists(os.path.join(p["meta"], "data.mdb")):
                made_lock = False  # the lock file is the existing store's
                raise errors.AlreadyExists(f"a store already exists in {path}")
            if config.pool_bytes is None:
                config.pool_bytes = default_pool_bytes(
                    _free_space(p["pool.dat"] if pool_given else path))
            config.validate()
            built = True
            cls._build(p, config, pool_given)
            os.chmod(path, 0o700)
            return cls.open(path, lock_fd=lock_fd)
        except BaseException:
            shutil.rmtree(p[".init"], ignore_errors=True)
            if built:  # nobody else can have used it: we hold the lock
                shutil.rmtree(p["meta"], ignore_errors=True)
                if not pool_given:
                    with contextlib.suppress(OSError):
                        os.unlink(p["pool.dat"])
            if made_lock:
                with contextlib.suppress(OSError):
                    os.unlink(p["lock"])
            if made_dir:  # never rmtree: another init may have won the directory meanwhile
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            os.close(lock_fd)
            raise

    @staticmethod
    def _build(p: dict[str, str], config: StoreConfig, pool_given: bool) -> None:
        """Make the environment (and the pool, unless given) in STORE/.init, then rename them
        into place."""
        tmp = p[".init"]
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed init's leftovers (we hold the lock)
        os.makedirs(os.path.join(tmp, "meta"), mode=0o700)
        pool = p["pool.dat"] if pool_given else os.path.join(tmp, "pool.dat")
        native = NativeStore(os.path.join(tmp, "meta"), pool, True,
                             not config.unsafe_nosync, config.map_bytes)
        try:
            with native.txn(write=True) as t:
                put = t.put
                put(DB_META, layout.META_FORMAT, layout.encode_u32(FORMAT_VERSION))
                put(DB_META, layout.META_BLOCK_SIZE, layout.encode_u32(BLOCK_SIZE))
                put(DB_META, layout.META_ALLOC, layout.encode_pair(0, 0))
                put(DB_META, layout.META_POOL_BLOCKS,
                    layout.encode_u64((config.pool_bytes or 0) // BLOCK_SIZE))
                put(DB_META, layout.META_NEXT_VOL, layout.encode_u32(1))
                put(DB_META, layout.META_SEQ, layout.encode_u64(0))
                put(DB_META, layout.META_BLOCKS, layout.encode_pair(0, 0))
                put(DB_META, layout.META_CONFIG, config.to_json())
            native.sync()
        finally:
            native.close()
        if not pool_given:
            os.replace(pool, p["pool.dat"])
        os.rename(os.path.join(tmp, "meta"), p["meta"])  # the commit point
        os.rmdir(tmp)

    @classmethod
    def open(cls, path: str, lock_fd: int | None = None) -> StoreDir:
        path = os.path.abspath(path)
        p = cls.paths(path)
        if not os.path.exists(os.path.join(p["meta"], "data.mdb")):
            raise errors.StoreNotFound(f"no snapdisk store in {path} (run `snapdisk init`)")
        own_lock = lock_fd is None
        if lock_fd is None:
            lock_fd = cls._lock(p["lock"])
        try:
            native = NativeStore(p["meta"], p["pool.dat"], False, True, DEFAULT_MAP_BYTES)
            try:
                config = cls._read_format(native, path)
                if config.unsafe_nosync or config.map_bytes != DEFAULT_MAP_BYTES:
                    # reopen with the store's own durability setting and map size
                    native.close()
                    native = NativeStore(p["meta"], p["pool.dat"], False,
                                         not config.unsafe_nosync, config.map_bytes)
            except BaseException:
                native.close()
                raise
        except BaseException:
            if own_lock:
                os.close(lock_fd)
            raise
        return cls(path, native, lock_fd, config)

    @staticmethod
    def _read_format(native: NativeStore, path: str) -> StoreConfig:
        """Check the format record, migrating an older format; returns the config."""
        with native.txn() as t:
            raw_format = t.get(DB_META, layout.META_FORMAT)
            raw_config = t.get(DB_META, layout.META_CONFIG)
        if raw_format is None or raw_config is None:
            raise errors.FormatError(f"{path}: not a snapdisk store (no format record)")
        version = layout.decode_u32(raw_format, "format version")
        if version != FORMAT_VERSION:
            with native.txn(write=True) as t:
                migrate(t, version, path)
                raw_config = t.get(DB_META, layout.META_CONFIG)
            native.sync()
        return StoreConfig.from_json(raw_config)

    @staticmethod
    def _lock(lock_path: str) -> int:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.StoreLocked(
                f"{os.path.dirname(lock_path)} is in use by another process "
                "(a running server: use the CLI through it, or stop it)") from None
        return fd

    def close(self) -> None:
        self.native.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def txn(self, write: bool = False) -> Txn:
        return self.native.txn(write)

    def save_config(self, t: Txn) -> None:
        t.put(DB_META, layout.META_CONFIG, self.config.to_json())
