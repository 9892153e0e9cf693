"""The benchmark lab: settings, the work directory with its datasets and servers, and the
helpers every scenario shares (benchmarks.scenarios has the scenarios themselves)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from benchmarks import datasets, fio, peers
from snapdisk.daemon import DEFAULT_THREADS

MIB = 1 << 20
GIB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))
MARKER = ".snapdisk-bench"
P = TypeVar("P")


@dataclass
class Settings:
    quick: bool = False
    workdir: str = "/var/tmp/snapdisk-bench"
    keep: bool = False
    rounds: int = 3
    seconds: float = 3.0  # one steady-state fio run (after ramp_s)
    ramp_s: float = 1.0
    size: int = 4 * GIB  # every volume
    nsnaps: int = 255
    first_write_bytes: int = 64 * MIB  # scenario 2: random 4 KiB writes right after a snapshot
    live_seconds: float = 10.0  # scenario 3: one fio run with / without a snapshot a second
    live_region: int = 1 * GIB  # scenario 3: the part of the volume fio writes
    small_written: int = 64 * MIB  # scenario 4
    latency_seconds: float = 5.0  # scenario 4: one fio run with snapshots every interval
    latency_interval: float = 0.2
    fractions: tuple[float, ...] = (0.01, 0.10, 0.50)  # scenario 5, of a volume of rollback_size
    rollback_size: int = 1 * GIB
    rss_written: int = 16 * GIB  # scenario 6: random 4 KiB blocks written (issue 9: 16 GiB)
    core_seconds: float = 0.3  # scenario 7 (per timed batch)
    conns: tuple[int, ...] = (1, 2, 4)  # scenario 8: NBD connections (fio numjobs)
    multi_seconds: float = 1.5  # scenario 8: one fio run (20 per round: about 2 min in all)
    multi_ramp_s: float = 0.0  # no ramp: CPU per request divides by every request served

    @classmethod
    def quick_mode(cls, workdir: str) -> Settings:
        return cls(quick=True, workdir=workdir, rounds=1, seconds=0.5, ramp_s=0.0, size=64 * MIB,
                   nsnaps=8, first_write_bytes=4 * MIB, live_seconds=2.0, live_region=64 * MIB,
                   small_written=4 * MIB, latency_seconds=1.5, latency_interval=0.2, rollback_size=64 * MIB,
                   rss_written=64 * MIB, core_seconds=0.02, multi_seconds=0.3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotate(items: list[P], k: int) -> list[P]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


class Lab:
    """The work directory, the datasets in it, and every server started for a scenario."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.dir = os.path.abspath(s.workdir)
        if os.path.exists(self.dir):
            # Only a directory this suite made (or an empty one) is emptied: never a user's.
            if os.listdir(self.dir) and not os.path.exists(os.path.join(self.dir, MARKER)):
                raise RuntimeError(f"--workdir {self.dir} is not empty and was not made by the benchmarks")
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        open(os.path.join(self.dir, MARKER), "w").close()
        self.fio_dir = os.path.join(self.dir, "fio")
        os.makedirs(self.fio_dir)
        # Unix socket paths are limited to 107 bytes: the daemons' sockets go in a short dir.
        self.sock_dir = tempfile.mkdtemp(prefix="sdb-", dir="/tmp")
        self.prep_seconds: dict[str, float] = {}
        self.running: list[peers.Peer] = []
        self._made: dict[str, str] = {}

    # ---- datasets -------------------------------------------------------------------------

    def _make(self, key: str, path: str, make: Callable[[], None]) -> str:
        if key not in self._made:
            t0 = time.monotonic()
            make()
            self.prep_seconds[key] = round(time.monotonic() - t0, 2)
            self._made[key] = path
        return self._made[key]

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def raw(self) -> str:
        p = self.path("raw.img")
        return self._make("raw", p, lambda: datasets.random_file(p, self.s.size))

    def qcow2(self, nsnaps: int) -> str:
        p = self.path(f"qcow2-{nsnaps}.qcow2")
        raw = self.raw()
        return self._make(f"qcow2-{nsnaps}", p, lambda: datasets.qcow2_with_snapshots(
            raw, p, nsnaps, self.s.size, self.sock_dir))

    def store(self, nsnaps: int) -> str:
        p = self.path(f"snapdisk-{nsnaps}")
        raw = self.raw()
        return self._make(f"snapdisk-{nsnaps}", p, lambda: datasets.snapdisk_store(
            p, raw, self.s.size, nsnaps, pool_bytes=12 * self.s.size))

    def drop(self, key: str) -> None:
        """Remove a dataset no later scenario needs (disk space, page cache), unless --keep."""
        p = self._made.pop(key, None)
        if p is None or self.s.keep:
            return
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)

    # ---- servers --------------------------------------------------------------------------

    def sock(self, name: str) -> str:
        return os.path.join(self.sock_dir, f"{name}.sock")

    def log(self, name: str) -> str:
        return self.path(f"{name}.log")

    def track(self, peer: P) -> P:
        self.running.append(peer)  # type: ignore[arg-type]
        return peer

    def stop_all(self) -> None:
        while self.running:
            p = self.running.pop()
            with contextlib.suppress(Exception):
                p.stop()

    def snapdisk(self, store: str, threads: str | None = None, name: str = "snapdisk") -> peers.Snapdisk:
        return self.track(peers.Snapdisk(store, threads or DEFAULT_THREADS, name, name))

    def close(self) -> None:
        self.stop_all()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if not self.s.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def _res(r: fio.Result) -> dict[str, Any]:
    return {"iops": r.iops, "bw_bytes": r.bw_bytes, "ios": r.ios, "runtime_s": r.runtime_s,
            "lat_p50_us": r.lat_p50_us, "lat_p99_us": r.lat_p99_us}


def _cache(lab: Lab, paths: dict[str, str]) -> dict[str, Any]:
    res = datasets.resident(list(paths.values()))
    return {name: {"resident_bytes": res[p][0], "allocated_bytes": res[p][1]} for name, p in paths.items()}
