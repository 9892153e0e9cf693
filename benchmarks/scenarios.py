"""The scenarios of the benchmark report, one function each, returning plain data (JSON-able).

    lab = Lab(settings); try: data = steady_state(lab) ... finally: lab.close()

Every comparison is made inside one run: the peers of a scenario run interleaved, round after
round, the order rotated each round so that drift (other jobs on the machine, page-cache
pressure, the disk's writeback) hits every peer alike; the report takes per-round ratios and
shows their median and min..max.

`Lab` owns the work directory: the backing files (benchmarks.datasets, made lazily and timed),
the sockets, fio's JSON and logs, and every server started (stopped by pid in `close()`): it
lives in benchmarks.lab.  Scenarios 3-5 (snapshots under load) are in
benchmarks.snapshot_scenarios, 8 (more than one connection) in benchmarks.multiconn.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import datasets, dr_bench, encryption, fio, memory, multiconn, peers, policy_bench
from benchmarks.lab import GIB, HERE, MIB, Lab, Settings, _cache, _res, rotate
from benchmarks.snapshot_scenarios import _phases, rollback_delete, snapshot_every_second, snapshot_latency
from snapdisk.daemon import DEFAULT_THREADS, THREAD_MODELS

__all__ = ["GIB", "MIB", "SCENARIOS", "Lab", "Settings", "_phases", "rotate"]


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
                    # The same first writes into a clone of the snapshot, and into the volume
                    # rolled back to it: their blocks are SHARED (other records hold them too)
                    clone = f"fwc-{r}"
                    sd.call("clone", volume=peers.EXPORT, snapshot=name, name=clone)
                    row["clone"] = _res(fio.run(sd.target(clone), w, lab.fio_dir,
                                                f"s2-r{r}-{p.name}-clone",
                                                io_size=s.first_write_bytes, randseed=1000 + r))
                    sd.call("volume.delete", name=clone)
                    sd.call("rollback", volume=peers.EXPORT, snapshot=name)
                    row["rollback"] = _res(fio.run(p.target(), w, lab.fio_dir,
                                                   f"s2-r{r}-{p.name}-rollback",
                                                   io_size=s.first_write_bytes, randseed=1000 + r))
                rows.append(row)
                if p is qn:
                    qn.stop()
    finally:
        lab.stop_all()
    return {"peers": [{"name": sd.name, "label": f"snapdisk (threads={sd.threads})"},
                      {"name": qn.name, "label": "qemu-nbd, qcow2 after qemu-img snapshot -c"}],
            "bytes": s.first_write_bytes, "rows": rows}


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
    "policy": policy_bench.policy_every_hour,
    "encryption": encryption.scenario,
    "disaster-recovery": dr_bench.scenario,
}
