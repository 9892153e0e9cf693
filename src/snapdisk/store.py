"""The store directory: what is in it, how it is opened, and who may write it.

    STORE/
      meta/data.mdb, meta/lock.mdb   LMDB environment: catalog and block maps (see extmap.py)
      pool.dat                       data pool: block N at byte N*4096, sparse
      lock                           flock()ed exclusively by the one process that writes
      nbd.sock, control.sock         the server's sockets (serve)
      server.pid                     the server's pid (serve)

One process at a time opens a store for writing (the server, or a CLI command when no server
runs); a second one gets StoreLocked.  Within that process the C core owns the LMDB environment
(native/xm_store.c); nothing else opens it.

META records (keys are ASCII):
    format      u32   on-disk format version (FORMAT_VERSION)
    block_size  u32   4096
    alloc       hwm:u64 hint:u64  high-water mark of the pool, next-fit allocation hint
    pool_blocks u64   the pool's capacity in blocks
    next_vol    u32   the next volume id
    seq         u64   bumped by each transaction that frees blocks (see allocator.py)
    blocks      free:u64 pending:u64  totals of the FREE and PENDING databases
    config      JSON  store options (sync mode, quotas)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .native import BLOCK_SIZE, DB_META, NativeStore, Txn

FORMAT_VERSION = 1
DEFAULT_MAP_BYTES = 64 << 30
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
U64x2 = struct.Struct("<QQ")


@dataclass
class StoreConfig:
    """Options fixed at `init` (and some changeable later)."""

    pool_bytes: int = 0  # 0: the free space of the filesystem at init
    sync_commits: bool = False
    manual_snapshot_quota: int = 256
    auto_snapshot_quota: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"pool_bytes": self.pool_bytes, "sync_commits": self.sync_commits,
                           "manual_snapshot_quota": self.manual_snapshot_quota,
                           "auto_snapshot_quota": self.auto_snapshot_quota,
                           **self.extra}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StoreConfig:
        d = json.loads(raw)
        known = {k: d.pop(k) for k in ("pool_bytes", "sync_commits", "manual_snapshot_quota",
                                       "auto_snapshot_quota") if k in d}
        return cls(**known, extra=d)


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
                ("meta", "pool.dat", "lock", "nbd.sock", "control.sock", "server.pid")}

    @classmethod
    def create(cls, path: str, config: StoreConfig | None = None) -> StoreDir:
        config = config or StoreConfig()
        path = os.path.abspath(path)
        p = cls.paths(path)
        if os.path.exists(os.path.join(p["meta"], "data.mdb")):
            raise errors.AlreadyExists(f"a store already exists in {path}")
        os.makedirs(p["meta"], mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        if config.pool_bytes == 0:
            config.pool_bytes = shutil.disk_usage(path).free
        if config.pool_bytes < BLOCK_SIZE * 16:
            raise errors.InvalidSize(f"pool size {config.pool_bytes} is too small")
        lock_fd = cls._lock(p["lock"])
        try:
            native = NativeStore(p["meta"], p["pool.dat"], True, config.sync_commits,
                                 DEFAULT_MAP_BYTES)
        except BaseException:
            os.close(lock_fd)
            raise
        with native.txn(write=True) as t:
            t.put(DB_META, b"format", U32.pack(FORMAT_VERSION))
            t.put(DB_META, b"block_size", U32.pack(BLOCK_SIZE))
            t.put(DB_META, b"alloc", U64x2.pack(0, 0))
            t.put(DB_META, b"pool_blocks", U64.pack(config.pool_bytes // BLOCK_SIZE))
            t.put(DB_META, b"next_vol", U32.pack(1))
            t.put(DB_META, b"seq", U64.pack(0))
            t.put(DB_META, b"blocks", U64x2.pack(0, 0))
            t.put(DB_META, b"config", config.to_json())
        native.sync()
        return cls(path, native, lock_fd, config)

    @classmethod
    def open(cls, path: str) -> StoreDir:
        path = os.path.abspath(path)
        p = cls.paths(path)
        if not os.path.exists(os.path.join(p["meta"], "data.mdb")):
            raise errors.StoreNotFound(f"no snapdisk store in {path} (run `snapdisk init`)")
        lock_fd = cls._lock(p["lock"])
        try:
            native = NativeStore(p["meta"], p["pool.dat"], False, False, DEFAULT_MAP_BYTES)
            try:
                with native.txn() as t:
                    raw_format = t.get(DB_META, b"format")
                    raw_config = t.get(DB_META, b"config")
                if raw_format is None or raw_config is None:
                    raise errors.FormatError(f"{path}: not a snapdisk store (no format record)")
                version = U32.unpack(raw_format)[0]
                if version != FORMAT_VERSION:
                    raise errors.FormatError(
                        f"{path}: on-disk format {version}, this snapdisk reads {FORMAT_VERSION}")
                config = StoreConfig.from_json(raw_config)
                if config.sync_commits:  # reopen with the store's own durability setting
                    native.close()
                    native = NativeStore(p["meta"], p["pool.dat"], False, True, DEFAULT_MAP_BYTES)
            except BaseException:
                native.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, native, lock_fd, config)

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
        t.put(DB_META, b"config", self.config.to_json())
