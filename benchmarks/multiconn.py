"""Scenario 8: 4 KiB random I/O over 1, 2 and 4 connections (NBD multi-conn), and what limits it.

fio's `numjobs=N` with the nbd engine: each job is its own process with its own NBD connection,
QD16 each (so 4 connections keep 64 requests in flight; one connection at QD16 already keeps any
of these servers busy, so what grows is the parallelism the server may use, not the queue it
sees).  Peers, all started once and used in turn, interleaved and rotated like scenario 1:

- nbdkit's C `file` plugin (THREAD_MODEL_PARALLEL, one thread per request in flight: the ceiling),
- the Python passthrough plugin, mode=requests (nbdkit's SERIALIZE_REQUESTS, snapdisk's own thread
  model: one request at a time per connection, connections in parallel), the ceiling of any Python
  plugin with that model: nbdkit embeds one interpreter, so every callback of every connection
  takes its one GIL (mode=serialized would serialize all connections by definition; mode=parallel
  hands the GIL between 16 worker threads per connection, slower in scenario 1),
- snapdisk's server (SERIALIZE_REQUESTS: one request at a time per connection, connections in
  parallel), on the volume of scenario 1's 0-snapshot store,
- two passthrough servers (two processes, two interpreters, two GILs) on the same raw file, two
  connections each, measured together: what N server processes could give over one store.

Around each fio run: the server's CPU time (utime and stime from /proc/PID/stat, all threads), its
busiest thread's (sampled during the run), fio's own (getrusage of the reaped children) and the
whole machine's busy time (/proc/stat), each as cores = CPU seconds / wall seconds, so the report
can say whether a peer is held at one core of interpreter time (the GIL: user time near 1.0), or
the two cores are simply full (server + fio + the kernel + whatever else runs on this shared machine).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks import fio, peers
from benchmarks.lab import Lab, rotate

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a whole process (all its threads, living and ended), seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def thread_cpu_s(pid: int) -> dict[int, float]:
    """utime + stime of each living thread of pid, seconds."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            continue
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores; iowait counts as idle)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / TICK  # guest time is already inside user


def _children_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _ThreadSampler(threading.Thread):
    """Each server thread's CPU time, sampled every period while the block runs: nbdkit's
    connection threads end with their connection, before any sample after the run could see them."""

    def __init__(self, pids: list[int], period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.first: dict[int, tuple[float, float]] = {}  # tid: (time, cpu s) first seen
        self.last: dict[int, tuple[float, float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            now = time.monotonic()
            for p in self.pids:
                with contextlib.suppress(OSError):
                    for tid, cpu in thread_cpu_s(p).items():
                        self.first.setdefault(tid, (now, cpu))
                        self.last[tid] = (now, cpu)
            if self.done.wait(self.period):
                return

    def hottest(self) -> float:
        """The busiest thread's cores over the time it was seen (at least 0.2 s of it)."""
        best = 0.0
        for tid, (t0, c0) in self.first.items():
            t1, c1 = self.last[tid]
            if t1 - t0 >= 0.2:
                best = max(best, (c1 - c0) / (t1 - t0))
        return best


@contextmanager
def probe(pids: list[int], out: dict[str, float]) -> Iterator[None]:
    """Fill out with the cores used during the block (CPU seconds / wall seconds): the server's
    (sum over pids; user = where the interpreter runs, under its GIL; sys = the syscalls), its
    busiest thread's, fio's (children reaped in the block; the daemons are not reaped while they
    run), the machine's, and the rest of the machine's (kernel threads such as writeback, and other
    jobs: this machine is shared)."""
    before = {p: cpu_s(p) for p in pids}
    sampler = _ThreadSampler(pids)
    m0, c0, t0 = machine_busy_s(), _children_s(), time.monotonic()
    sampler.start()
    try:
        yield
    finally:
        sampler.done.set()
        sampler.join(5)
    wall = max(1e-6, time.monotonic() - t0)
    user = sum(cpu_s(p)[0] - before[p][0] for p in pids)
    sys_ = sum(cpu_s(p)[1] - before[p][1] for p in pids)
    fio_s, machine = _children_s() - c0, machine_busy_s() - m0
    out.update(wall_s=wall, server_cpu_s=user + sys_, server_cores=(user + sys_) / wall,
               server_user_cores=user / wall, server_sys_cores=sys_ / wall,
               hot_thread_cores=sampler.hottest(), fio_cores=fio_s / wall, machine_cores=machine / wall,
               other_cores=max(0.0, machine - user - sys_ - fio_s) / wall)


def multi_conn(lab: Lab) -> dict[str, Any]:
    s = lab.s
    raw, st0 = lab.raw(), lab.store(0)
    pt = peers.Passthrough(raw, "requests", lab.sock("mc-pt"), lab.log("mc-passthrough"))
    pt2 = [peers.Passthrough(raw, "requests", lab.sock(f"mc-pt2{c}"), lab.log(f"mc-passthrough2{c}"))
           for c in "ab"]
    single: list[peers.Peer] = [peers.NbdkitFile(raw, lab.sock("mc-file"), lab.log("mc-nbdkit-file")), pt]
    sd = lab.snapdisk(st0, name="snapdisk")
    two = "passthrough-2proc"
    conns = list(s.conns)
    # (peer name, connections, processes): every configuration measured once per workload per round.
    configs: list[tuple[str, int, int]] = [(p, c, 1) for p in ("nbdkit-file", pt.name, sd.name)
                                           for c in conns]
    most = max(conns)
    if most % 2 == 0:
        configs.append((two, most, 2))
    rows: list[dict[str, Any]] = []
    try:
        for p in [*single, *pt2]:
            lab.track(p).start()
        sd.start()
        by_name = {p.name: p for p in single}
        by_name[sd.name] = sd
        for r in range(s.rounds):
            for wi, wname in enumerate(("randread", "randwrite")):
                w = fio.WORKLOADS[wname]
                for name, c, procs in rotate(configs, r * 2 + wi):
                    if procs == 1:
                        p = by_name[name]
                        targets, pids = [p.target()], [p.pid]
                        numjobs = c
                    else:
                        targets, pids = [q.target() for q in pt2], [q.pid for q in pt2]
                        numjobs = c // 2
                    assert all(pids)
                    cpu: dict[str, float] = {}
                    with probe([int(x) for x in pids if x], cpu):
                        res = fio.run(targets, w, lab.fio_dir, f"s8-r{r}-{wname}-{name}-{c}", numjobs=numjobs,
                                      seconds=s.multi_seconds, ramp_s=s.multi_ramp_s)
                    rows.append({"round": r, "workload": wname, "peer": name, "conns": c, "procs": procs,
                                 "iops": res.iops, "bw_bytes": res.bw_bytes, "ios": res.ios,
                                 "lat_p50_us": res.lat_p50_us, "lat_p99_us": res.lat_p99_us,
                                 # no ramp (multi_ramp_s 0): ios counts every request the CPU served
                                 "server_cpu_us_per_io": cpu["server_cpu_s"] / res.ios * 1e6
                                 if res.ios and not s.multi_ramp_s else None, **cpu})
    finally:
        lab.stop_all()
    return {"peers": [{"name": "nbdkit-file", "label": "nbdkit file plugin (C)"},
                      {"name": pt.name, "label": "Python passthrough, mode=requests (one process)"},
                      {"name": sd.name, "label": f"snapdisk (threads={sd.threads})"},
                      {"name": two, "label": "two Python passthrough processes (mode=requests), same file"}],
            "conns": conns, "iodepth": fio.WORKLOADS["randread"].iodepth, "ncpu": os.cpu_count(),
            "seconds": s.multi_seconds, "ramp_s": s.multi_ramp_s, "rows": rows}

