"""Fixtures for the tests that run the real server: nbdkit with snapdisk's plugin, per test.

`server` makes a store in the test's tmp dir, starts the server through snapdisk.daemon.serve
(in the background, as `snapdisk serve` does) and always stops it by pid afterwards, even when
the test failed: control-socket stop, then SIGKILL by pid; teardown fails the test if an
nbdkit it started is still alive.  `served(store)` does the same for a store a test made.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapdisk import daemon as srv
from snapdisk.control.client import Client
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

POOL_BYTES = 512 << 20


@dataclass
class Served:
    store: str
    pid: int
    nbd_socket: str | None
    control_socket: str
    info: srv.ServerInfo
    started: list[int] = field(default_factory=list)  # every pid to reap at teardown

    def uri(self, export: str = "") -> str:
        return self.info.uri(export)

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.control_socket, timeout=timeout)

    def call(self, op: str, **args: object) -> object:
        with self.client() as c:
            return c.call(op, **args)

    def connect(self, export: str = "", meta: bool = True):  # type: ignore[no-untyped-def]
        """A libnbd handle on export (base:allocation negotiated when meta)."""
        import nbd
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(self.uri(export))
        return h


def new_store(path: Path, pool_bytes: int = 256 << 20) -> Engine:
    """A new store, open (the caller closes it)."""
    return Engine.create(str(path), StoreConfig(pool_bytes=pool_bytes))


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two new stores, a sender and a receiver (backups, raw transfer), closed after."""
    a, b = new_store(tmp_path / "a"), new_store(tmp_path / "b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def make_store(path: str | Path, pool_bytes: int = POOL_BYTES,
               volumes: dict[str, int] | None = None) -> str:
    path = str(path)
    with Engine.create(path, StoreConfig(pool_bytes=pool_bytes)) as e:
        for name, size in (volumes or {}).items():
            e.create_volume(name, size)
    return path


def _reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while srv._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


@contextlib.contextmanager
def served_store(store: str, listen: str | None = None,
                 threads: str | None = None, **serve_args: bool) -> Iterator[Served]:
    pids: list[int] = []
    try:
        info = srv.serve(store, listen=listen, timeout=30, threads=threads, **serve_args)
        pids.append(info.pid)
        yield Served(store, info.pid, info.nbd_socket, info.control_socket, info, pids)
    finally:
        pidfile_pid = srv._read_pid(srv.paths(store)["pidfile"])
        if pidfile_pid is not None and pidfile_pid not in pids:
            pids.append(pidfile_pid)
        for pid in pids:
            if srv._alive(pid):
                with contextlib.suppress(Exception):
                    srv.stop(store, timeout=10)
            if srv._alive(pid):
                _reap(pid)
        left = [pid for pid in pids if srv._alive(pid)]
        assert not left, f"nbdkit left behind: {left}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """served(store, listen=None, threads=None) -> Served: start a server on a store the test
    made; it is stopped by pid at teardown."""
    stack = contextlib.ExitStack()

    def start(store: str, listen: str | None = None, threads: str | None = None,
              **serve_args: bool) -> Served:
        return stack.enter_context(served_store(store, listen, threads, **serve_args))

    with stack:
        yield start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    """A server on a fresh, empty store (512 MiB pool) in tmp_path/store."""
    store = make_store(tmp_path / "store")
    with served_store(store) as s:
        yield s
