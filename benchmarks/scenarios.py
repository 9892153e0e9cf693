"""The scenarios of the benchmark report, one function each, returning plain data (JSON-able).

    lab = Lab(settings); try: data = steady_state(lab) ... finally: lab.close()

Every comparison is made inside one run: the peers of a scenario run interleaved, round after
round, the order rotated each round so that drift (other jobs on the machine, page-cache
pressure, the disk's writeback) hits every peer alike; the report takes per-round ratios and
shows their median and min..max.

`Lab` owns the work directory: the backing files (benchmarks.datasets, made lazily and timed),
the sockets, fio's JSON and logs, and every server started (stopped by pid in `close()`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from benchmarks import datasets, fio, memory, multiconn, peers
from snapdisk.daemon import DEFAULT_THREADS, THREAD_MODELS

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
    multi_seconds: float = 1.5  # scenario 8: one fio run (after multi_ramp_s)
    multi_ramp_s: float = 0.5

    @classmethod
    def quick_mode(cls, workdir: str) -> Settings:
        return cls(quick=True, workdir=workdir, rounds=1, seconds=0.5, ramp_s=0.0, size=64 * MIB,
                   nsnaps=8, first_write_bytes=4 * MIB, live_seconds=2.0, live_region=64 * MIB,
                   small_written=4 * MIB, latency_seconds=1.5, latency_interval=0.2, rollback_size=64 * MIB,
                   rss_written=64 * MIB, core_seconds=0.02, multi_seconds=0.3, multi_ramp_s=0.0)

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


# ---- 1. steady state ------------------------------------------------------------------------

def steady_state(lab: Lab) -> dict[str, Any]:
    s = lab.s
    raw, q0, qn = lab.raw(), lab.qcow2(0), lab.qcow2(s.nsnaps)
    st0, stn = lab.store(0), lab.store(s.nsnaps)
    n = s.nsnaps
    ps: list[peers.Peer] = [
        peers.RawFile(raw),
        peers.NbdkitFile(raw, lab.sock("file"), lab.log("nbdkit-file")),
        peers.Passthrough(raw, "serialized", lab.sock("pt-ser"), lab.log("passthrough-serialized")),
        peers.Passthrough(raw, "parallel", lab.sock("pt-par"), lab.log("passthrough-parallel")),
        peers.QemuNbd(q0, "qemu-nbd-qcow2-0", "qemu-nbd, qcow2, 0 snapshots", lab.sock("qn0"),
                      lab.log("qemu-nbd-0")),
        peers.QemuNbd(qn, f"qemu-nbd-qcow2-{n}", f"qemu-nbd, qcow2, {n} snapshots", lab.sock("qnn"),
                      lab.log(f"qemu-nbd-{n}")),
    ]
    groups: dict[str, peers.Shared] = {}
    modes = list(THREAD_MODELS)
    for k, store in ((0, st0), (n, stn)):
        groups[store] = peers.Shared()
        for mode in modes:
            name = f"snapdisk-{k}-{mode}"
            label = f"snapdisk, {k} snapshots, threads={mode}"
            ps.append(lab.track(peers.Snapdisk(store, mode, name, label)))
    shared_of = {p.name: groups[p.store] for p in ps if isinstance(p, peers.Snapdisk)}
    files = {"raw.img": raw, "qcow2-0": q0, f"qcow2-{n}": qn, "snapdisk-0": st0, f"snapdisk-{n}": stn}
    rows: list[dict[str, Any]] = []
    try:
        for p in ps:
            if p.name not in shared_of:
                lab.track(p).start()
        cache_before = _cache(lab, files)
        for r in range(s.rounds):
            for wi, w in enumerate(fio.WORKLOADS.values()):
                for p in rotate(ps, r * 3 + wi):
                    if p.name in shared_of:
                        shared_of[p.name].switch(p)
                    res = fio.run(p.target(), w, lab.fio_dir, f"s1-r{r}-{w.name}-{p.name}",
                                  seconds=s.seconds, ramp_s=s.ramp_s)
                    rows.append({"round": r, "workload": w.name, "peer": p.name, **_res(res)})
        cache_after = _cache(lab, files)
    finally:
        lab.stop_all()
    lab.drop(f"qcow2-{n}")
    lab.drop(f"snapdisk-{n}")
    return {"peers": [{"name": p.name, "label": p.label} for p in ps],
            "workloads": {w.name: w.label for w in fio.WORKLOADS.values()},
            "thread_models": modes, "default_threads": DEFAULT_THREADS, "nsnaps": n,
            "rows": rows, "cache_before": cache_before, "cache_after": cache_after}


# ---- 2. first writes after a snapshot -------------------------------------------------------

def first_writes(lab: Lab) -> dict[str, Any]:
    s = lab.s
    st0, q0 = lab.store(0), lab.qcow2(0)
    sd = lab.snapdisk(st0, name="snapdisk")
    qn = lab.track(peers.QemuNbd(q0, "qemu-nbd-qcow2", "qemu-nbd, qcow2", lab.sock("qn-fw"),
                                 lab.log("qemu-nbd-fw")))
    w = fio.WORKLOADS["randwrite"]
    rows: list[dict[str, Any]] = []
    try:
        for r in range(s.rounds):
            for p in rotate([sd, qn], r):
                name = f"fw-{r}"
                if p is sd:
                    sd.start()
                    t0 = time.perf_counter()
                    sd.call("snapshot.create", volume=peers.EXPORT, name=name)
                else:
                    qn.stop()  # qemu-img snapshot -c works on a closed image
                    t0 = time.perf_counter()
                    subprocess.run(["qemu-img", "snapshot", "-c", name, q0], check=True, capture_output=True)
                snap_ms = (time.perf_counter() - t0) * 1000
                p.start()
                # randseed: the in-place run below writes the very blocks these first writes did.
                res = fio.run(p.target(), w, lab.fio_dir, f"s2-r{r}-{p.name}", io_size=s.first_write_bytes,
                              randseed=1000 + r)
                row = {"round": r, "peer": p.name, "snapshot_ms": snap_ms, **_res(res)}
                if p is sd:  # the same blocks again: now the volume's own, written in place
                    again = fio.run(p.target(), w, lab.fio_dir, f"s2-r{r}-{p.name}-inplace",
                                    io_size=s.first_write_bytes, randseed=1000 + r)
                    row["inplace"] = _res(again)
                rows.append(row)
                if p is qn:
                    qn.stop()
    finally:
        lab.stop_all()
    return {"peers": [{"name": sd.name, "label": f"snapdisk (threads={sd.threads})"},
                      {"name": qn.name, "label": "qemu-nbd, qcow2 after qemu-img snapshot -c"}],
            "bytes": s.first_write_bytes, "rows": rows}


# ---- 3. a snapshot every second while fio runs ----------------------------------------------

class Ticker:
    """Calls take(name) every interval seconds in a thread, timing each call."""

    def __init__(self, take: Callable[[str], Any], interval: float, prefix: str, first_after: float) -> None:
        self.take, self.interval, self.prefix = take, interval, prefix
        self.first_after = first_after
        self.samples: list[tuple[float, float]] = []  # (unix time at start, seconds)
        self.replies: list[Any] = []  # what each take returned (snapdisk: the control op's result)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        nxt = time.monotonic() + self.first_after
        i = 0
        while not self._stop.wait(max(0.0, nxt - time.monotonic())):
            t_wall, t0 = time.time(), time.perf_counter()
            try:
                reply = self.take(f"{self.prefix}-{i}")
            except BaseException as e:  # reported by stop()
                self.error = e
                return
            self.samples.append((t_wall, time.perf_counter() - t0))
            self.replies.append(reply)
            i += 1
            nxt += self.interval

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None and exc[0] is None:
            raise RuntimeError(f"snapshot failed: {self.error}") from self.error


@contextlib.contextmanager
def _snapshotter(p: peers.Peer, volume: str = peers.EXPORT) -> Iterator[tuple[Callable[[str], Any],
                                                                           Callable[[str], Any]]]:
    """(take(name), delete(name)) over one persistent control connection (snapdisk's control
    socket, or qemu-storage-daemon's QMP monitor), as a scheduler would hold it."""
    if isinstance(p, peers.Snapdisk):
        with p.client() as c:
            yield (lambda name: c.call("snapshot.create", volume=volume, name=name),
                   lambda name: c.call("snapshot.delete", volume=volume, snapshot=name))
    else:
        assert isinstance(p, peers.QemuStorageDaemon)
        yield p.snapshot, p.delete_snapshot


def _windows(log: list[tuple[float, float]], t0: float, t1: float) -> list[float]:
    return [v for t, v in log if t0 <= t <= t1]


def snapshot_every_second(lab: Lab) -> dict[str, Any]:
    s = lab.s
    st0, q0 = lab.store(0), lab.qcow2(0)
    sd = lab.snapdisk(st0, name="snapdisk")
    qsd = lab.track(peers.QemuStorageDaemon(q0, lab.sock("qsd"), lab.sock("qsd-qmp"), lab.log("qsd")))
    region = min(s.live_region, s.size)
    w, fill = fio.WORKLOADS["randwrite"], fio.WORKLOADS["seqwrite"]
    rows: list[dict[str, Any]] = []
    try:
        for r in range(s.rounds):
            for p in rotate([sd, qsd], r):
                p.start()
                tgt = p.target()
                # The live data is the volume's own again (no snapshot shares it): in place.
                fio.run(tgt, fill, lab.fio_dir, f"s3-r{r}-{p.name}-fill", io_size=region, size=region)
                none = fio.run(tgt, w, lab.fio_dir, f"s3-r{r}-{p.name}-none", seconds=s.live_seconds,
                               size=region, iops_log=True, log_msec=250)
                with _snapshotter(p) as (take, delete):
                    bg = fio.Background(tgt, w, lab.fio_dir, f"s3-r{r}-{p.name}-snap", s.live_seconds,
                                        size=region)
                    try:
                        bg.wait_started()
                        with Ticker(take, 1.0, f"live-{r}", first_after=0.5) as tick:
                            time.sleep(max(0.0, bg.started + s.live_seconds - time.time() - 0.3))
                        snap = bg.finish()
                    finally:
                        bg.kill()
                    deletes = []
                    for i in range(len(tick.samples)):
                        t0 = time.perf_counter()
                        delete(f"live-{r}-{i}")
                        deletes.append(time.perf_counter() - t0)
                p.stop()
                rows.append({"round": r, "peer": p.name, "none": _res(none), "snap": _res(snap),
                             "none_log": none.log, "snap_log": snap.log,
                             "snapshots": tick.samples, "delete_s": deletes, **_phases(tick.replies)})
    finally:
        lab.stop_all()
    return {"peers": [{"name": sd.name, "label": f"snapdisk (threads={sd.threads}), control socket"},
                      {"name": qsd.name,
                       "label": "qemu-storage-daemon qcow2, QMP blockdev-snapshot-internal-sync"}],
            "region_bytes": region, "seconds": s.live_seconds, "rows": rows}


# ---- 4. snapshot latency vs data written ----------------------------------------------------

def snapshot_latency(lab: Lab) -> dict[str, Any]:
    s = lab.s
    st0 = lab.store(0)  # volume v: s.size written
    sd = lab.snapdisk(st0, name="snapdisk")
    small = "small"
    rows: list[dict[str, Any]] = []
    try:
        sd.start()
        if small not in [v["name"] for v in sd.call("volume.list")]:
            sd.call("volume.create", name=small, size_bytes=s.size)
        fio.run(sd.target(small), fio.WORKLOADS["seqwrite"], lab.fio_dir, "s4-fill-small",
                io_size=s.small_written, size=s.small_written)
        written = {small: s.small_written, peers.EXPORT: s.size}
        for r in range(s.rounds):
            for vol in rotate([small, peers.EXPORT], r):
                with _snapshotter(sd, vol) as (take, delete):
                    bg = fio.Background(sd.target(vol), fio.WORKLOADS["randwrite"], lab.fio_dir,
                                        f"s4-r{r}-{vol}", s.latency_seconds, size=written[vol])
                    try:
                        bg.wait_started()
                        with Ticker(take, s.latency_interval, f"lat-{r}", first_after=0.2) as tick:
                            time.sleep(max(0.0, bg.started + s.latency_seconds - time.time() - 0.3))
                        res = bg.finish()
                    finally:
                        bg.kill()
                    for i in range(len(tick.samples)):
                        delete(f"lat-{r}-{i}")
                rows.append({"round": r, "volume": vol, "written_bytes": written[vol],
                             "latency_s": [lat for _, lat in tick.samples], "fio": _res(res),
                             **_phases(tick.replies)})
    finally:
        lab.stop_all()
    return {"interval_s": s.latency_interval, "rows": rows}


def _phases(replies: list[Any]) -> dict[str, list[float]]:
    """The server's own timing of each snapshot, where `snapshot.create` reports it (issue 9
    item 3: `gate_wait_ms`, the wait for the I/O gate; `commit_ms`, the transaction): one list per
    field that every reply has, none when a server does not report them."""
    out: dict[str, list[float]] = {}
    for key in ("gate_wait_ms", "commit_ms"):
        vals = [r.get(key) for r in replies if isinstance(r, dict)]
        if replies and len(vals) == len(replies) and all(isinstance(v, int | float) for v in vals):
            out[key] = [float(v) for v in vals]  # type: ignore[arg-type]
    return out


# ---- 5. rollback and delete vs data changed -------------------------------------------------

def rollback_delete(lab: Lab) -> dict[str, Any]:
    s = lab.s
    st0 = lab.store(0)
    sd = lab.snapdisk(st0, name="snapdisk")
    vol = "rb"
    size = min(s.rollback_size, s.size)
    rows: list[dict[str, Any]] = []
    rw, rr = fio.WORKLOADS["randwrite"], fio.WORKLOADS["randread"]
    try:
        sd.start()
        if vol not in [v["name"] for v in sd.call("volume.list")]:
            sd.call("volume.create", name=vol, size_bytes=size)
        fio.run(sd.target(vol), fio.WORKLOADS["seqwrite"], lab.fio_dir, "s5-fill", io_size=size)
        for r in range(s.rounds):
            for f in rotate(list(s.fractions), r):
                changed = max(4096, int(f * size) // 4096 * 4096)
                tag = f"s5-r{r}-{round(f * 100)}"
                # delete: snapshot a, change f of the volume (distinct random 4 KiB blocks), then
                # delete a (it owns exactly what changed) while fio reads.
                sd.call("snapshot.create", volume=vol, name=f"{tag}-a")
                fio.run(sd.target(vol), rw, lab.fio_dir, f"{tag}-change-a", io_size=changed)
                bg = fio.Background(sd.target(vol), rr, lab.fio_dir, f"{tag}-delete-io", 600, log_msec=100)
                try:
                    bg.wait_started()
                    time.sleep(1.0)
                    t0 = time.time()
                    sd.call("snapshot.delete", volume=vol, snapshot=f"{tag}-a")
                    t1 = time.time()
                    time.sleep(1.0)
                    bg.stop_early()
                    io = bg.finish()
                finally:
                    bg.kill()
                before = _windows(io.log, t0 - 0.9, t0)
                during = [v for t, v in io.log if t0 < t <= t1 + 0.1]
                # rollback: snapshot b, change f, roll back to b (no client connected).
                sd.call("snapshot.create", volume=vol, name=f"{tag}-b")
                fio.run(sd.target(vol), rw, lab.fio_dir, f"{tag}-change-b", io_size=changed)
                t2 = time.perf_counter()
                sd.call("rollback", volume=vol, snapshot=f"{tag}-b")
                rollback_s = time.perf_counter() - t2
                t3 = time.perf_counter()
                sd.call("snapshot.delete", volume=vol, snapshot=f"{tag}-b")
                rows.append({"round": r, "fraction": f, "changed_bytes": changed,
                             "delete_s": t1 - t0, "rollback_s": rollback_s,
                             "delete_after_rollback_s": time.perf_counter() - t3,
                             "iops_before_delete": statistics.mean(before) if before else None,
                             "iops_during_delete": statistics.mean(during) if during else None,
                             "delete_log": [(t - t0, v) for t, v in io.log]})
    finally:
        lab.stop_all()
    return {"volume_bytes": size, "rows": rows}


# ---- 6. server RSS while writing ------------------------------------------------------------

def server_rss(lab: Lab) -> dict[str, Any]:
    s = lab.s
    store = lab.path("snapdisk-rss")
    volume = max(s.size, s.rss_written)  # so that every 4 KiB block written is a new one
    datasets.empty_store(store, {peers.EXPORT: volume}, pool_bytes=2 * volume)
    sd = lab.snapdisk(store, name="snapdisk")
    samples: list[tuple[float, dict[str, int]]] = []
    try:
        sd.start()
        pid = sd.pid
        assert pid is not None
        # io_size: fio stops once every block was written once (its random map).
        bg = fio.Background(sd.target(), fio.WORKLOADS["randwrite"], lab.fio_dir, "s6-rss",
                            io_size=s.rss_written, size=s.rss_written, log_msec=500)
        t0 = bg.started
        try:
            while bg.proc.poll() is None:
                samples.append((time.time() - t0, peers.rss(pid)))
                time.sleep(0.5)
            samples.append((time.time() - t0, peers.rss(pid)))
            res = bg.finish()
        finally:
            bg.kill()
        # What the map pages cost at the end, and what is left after asking the kernel to take
        # them back from this process alone (benchmarks/memory.py).
        before = memory.mapped(pid, store)
        rss_before = peers.rss(pid)
        rec = memory.reclaim(pid, store)
        rss_after = peers.rss(pid)
    finally:
        lab.stop_all()
        if not s.keep:
            shutil.rmtree(store, ignore_errors=True)
    return {"written_bytes": s.rss_written, "volume_bytes": volume, "seconds": samples[-1][0],
            "fio": _res(res), "samples": samples, "max": {k: max(x[1].get(k, 0) for x in samples)
                                                          for k in ("VmRSS", "RssAnon", "RssFile")},
            "maps_before": before, "maps_after": rec["after"], "reclaim_error": rec["error"],
            "rss_before_reclaim": rss_before, "rss_after_reclaim": rss_after}


# ---- 7. the C core vs its Python twin ---------------------------------------------------------

def core(lab: Lab) -> dict[str, Any]:
    script = os.path.join(HERE, "test_core_bench.py")
    out = subprocess.run([sys.executable, script, str(lab.s.core_seconds)], capture_output=True, text=True,
                         timeout=900, cwd=os.path.dirname(HERE))
    if out.returncode != 0:
        raise RuntimeError(f"test_core_bench.py failed: {out.stderr[-2000:]}")
    rows = []
    for line in out.stdout.splitlines()[1:]:
        m = re.match(r"(.+?)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x\s*$", line)
        if m:
            rows.append({"routine": m.group(1).strip(), "c_ops_s": float(m.group(2).replace(",", "")),
                         "py_ops_s": float(m.group(3).replace(",", "")), "ratio": float(m.group(4))})
    return {"stdout": out.stdout, "rows": rows}


SCENARIOS: dict[str, Callable[[Lab], dict[str, Any]]] = {
    "steady": steady_state,
    "multi-conn": multiconn.multi_conn,
    "first-writes": first_writes,
    "live-snapshots": snapshot_every_second,
    "snapshot-latency": snapshot_latency,
    "rollback-delete": rollback_delete,
    "rss": server_rss,
    "core": core,
}
