"""Scenarios 3 (a snapshot every second), 4 (snapshot latency) and 5 (rollback and delete):
the ones that take snapshots while fio runs.  Registered in benchmarks.scenarios.SCENARIOS."""

from __future__ import annotations

import contextlib
import mmap
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks import fio, peers
from benchmarks.lab import Lab, _res, rotate

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

class FloorProbe:
    """The physical floor of a snapshot's reply, measured beside it under the same fio load: a
    small durable commit costs at least one page written and msync()ed into a mapped file (LMDB's
    commit with MDB_WRITEMAP) plus one fdatasync (its durability point), on the filesystem of the
    store.  Every interval seconds in a thread; samples in seconds."""

    def __init__(self, directory: str, interval: float = 0.1) -> None:
        self.path = os.path.join(directory, ".floor-probe")
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 1 << 20)
            with mmap.mmap(fd, 1 << 20) as m:
                i = 0
                while not self._stop.wait(self.interval):
                    t0 = time.perf_counter()
                    off = (i % 256) * 4096
                    m[off:off + 8] = i.to_bytes(8, "little")
                    m.flush(off, 4096)  # msync(MS_SYNC) of the one page
                    os.fdatasync(fd)
                    self.samples.append(time.perf_counter() - t0)
                    i += 1
        finally:
            os.close(fd)
            os.unlink(self.path)

    def __enter__(self) -> FloorProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


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
        # (volume, the region fio writes): each volume over its written part (the load of the
        # p99 target), and the big one over the small one's region too, so that the two
        # volumes' snapshots are also compared under the same load: over its whole 4 GiB every
        # write after a snapshot is a redirect and a batch holds far more of them (issue 9's
        # ratio "4 GiB written / 64 MiB written" is about what the volume holds, not the load)
        runs = [(small, s.small_written), (peers.EXPORT, s.size), (peers.EXPORT, s.small_written)]
        for r in range(s.rounds):
            for vol, region in rotate(runs, r):
                with _snapshotter(sd, vol) as (take, delete):
                    bg = fio.Background(sd.target(vol), fio.WORKLOADS["randwrite"], lab.fio_dir,
                                        f"s4-r{r}-{vol}-{region >> 20}m", s.latency_seconds,
                                        size=region)
                    try:
                        bg.wait_started()
                        with Ticker(take, s.latency_interval, f"lat-{r}", first_after=0.2) as tick, \
                                FloorProbe(os.path.dirname(os.path.abspath(st0))) as floor:
                            time.sleep(max(0.0, bg.started + s.latency_seconds - time.time() - 0.3))
                        res = bg.finish()
                    finally:
                        bg.kill()
                    for i in range(len(tick.samples)):
                        delete(f"lat-{r}-{i}")
                rows.append({"round": r, "volume": vol, "written_bytes": written[vol],
                             "region_bytes": region, "latency_s": [lat for _, lat in tick.samples],
                             "fio": _res(res),
                             "floor_s": floor.samples, **_phases(tick.replies)})
    finally:
        lab.stop_all()
    return {"interval_s": s.latency_interval, "rows": rows}


def _phases(replies: list[Any]) -> dict[str, list[float]]:
    """The server's own timing of each snapshot, where `snapshot.create` reports it (issue 9
    item 3: `gate_wait_ms`, the wait for the I/O gate; `commit_ms`, the transaction): one list per
    field that every reply has, none when a server does not report them."""
    out: dict[str, list[float]] = {}
    for key in ("gate_wait_ms", "commit_ms", "batch_wait_ms", "sync_ms"):
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
                # delete a (it owns exactly what changed) while fio reads.  Each change ends with
                # a FLUSH (end_fsync): the timed operation after it must not pay for the writes'
                # durability (their data's fdatasync and their last batch), which it did before
                # (a delete right after 512 MiB of writes synced them first).
                sd.call("snapshot.create", volume=vol, name=f"{tag}-a")
                fio.run(sd.target(vol), rw, lab.fio_dir, f"{tag}-change-a", io_size=changed,
                        end_fsync=True)
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
                # the same delete with no client I/O: the walk runs unpaced (bulk_pace.py slows
                # it while requests are served, to keep their rate): its own cost
                sd.call("snapshot.create", volume=vol, name=f"{tag}-c")
                fio.run(sd.target(vol), rw, lab.fio_dir, f"{tag}-change-c", io_size=changed,
                        end_fsync=True)
                t4 = time.perf_counter()
                sd.call("snapshot.delete", volume=vol, snapshot=f"{tag}-c")
                delete_idle_s = time.perf_counter() - t4
                # rollback: snapshot b, change f, roll back to b (no client connected).
                sd.call("snapshot.create", volume=vol, name=f"{tag}-b")
                fio.run(sd.target(vol), rw, lab.fio_dir, f"{tag}-change-b", io_size=changed,
                        end_fsync=True)
                t2 = time.perf_counter()
                sd.call("rollback", volume=vol, snapshot=f"{tag}-b")
                rollback_s = time.perf_counter() - t2
                t3 = time.perf_counter()
                sd.call("snapshot.delete", volume=vol, snapshot=f"{tag}-b")
                rows.append({"round": r, "fraction": f, "changed_bytes": changed,
                             "delete_s": t1 - t0, "delete_idle_s": delete_idle_s,
                             "rollback_s": rollback_s,
                             "delete_after_rollback_s": time.perf_counter() - t3,
                             "iops_before_delete": statistics.mean(before) if before else None,
                             "iops_during_delete": statistics.mean(during) if during else None,
                             "delete_log": [(t - t0, v) for t, v in io.log]})
    finally:
        lab.stop_all()
    return {"volume_bytes": size, "rows": rows}
