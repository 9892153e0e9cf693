"""Run fio against one target and read back what it measured.

A target is either an NBD export (fio's `nbd` engine, `nbd+unix:///EXPORT?socket=SOCK`) or a
file fio opens itself (the machine's limit: io_uring on the raw file, buffered).  Every job is
one process, one job, one connection, with `invalidate=0` so fio never drops the page cache
between peers, and JSON output to a file (the nbd engine prints a line on stdout first).

    result = run(target, WORKLOADS["randread"], out_dir, "s1-r0-file-randread", seconds=5)
    result.iops, result.bw_bytes, result.log   # log: [(unix time s, IOPS)] when asked for

Long jobs in the background (a snapshot or a delete while fio runs) use `start()` and
`Background.finish()`; fio logs Unix timestamps (`log_unix_epoch=1`) so the log lines up with
the orchestrator's own clock.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    label: str


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("randread", "randread", "4k", 16, "4 KiB random read, QD16"),
    Workload("randwrite", "randwrite", "4k", 16, "4 KiB random write, QD16"),
    Workload("seqread", "read", "1m", 4, "1 MiB sequential read, QD4"),
    Workload("seqwrite", "write", "1m", 4, "1 MiB sequential write, QD4"),
)}


@dataclass(frozen=True)
class Target:
    """Where fio does its I/O: an NBD URI, or a file with a local engine."""

    uri: str | None = None
    filename: str | None = None
    engine: str = "io_uring"

    def args(self) -> list[str]:
        if self.uri is not None:
            return ["--ioengine=nbd", f"--uri={self.uri}"]
        assert self.filename is not None
        return [f"--ioengine={self.engine}", f"--filename={self.filename}", "--direct=0"]


@dataclass
class Result:
    iops: float
    bw_bytes: float
    ios: int
    runtime_s: float
    lat_p50_us: float
    lat_p99_us: float
    log: list[tuple[float, float]] = field(default_factory=list)


class FioError(RuntimeError):
    pass


COMMON = ["--invalidate=0", "--output-format=json", "--randrepeat=0"]


def command(target: Target | list[Target], w: Workload, json_out: str, *, seconds: float | None = None,
            ramp_s: float = 0.0, io_size: int | None = None, size: int | None = None,
            iops_log: str | None = None, log_msec: int = 500, numjobs: int = 1,
            randseed: int | None = None, end_fsync: bool = False) -> list[str]:
    """The fio argv: time-based when seconds is given, else until io_size bytes are done.

    numjobs > 1 runs that many jobs per target (with the nbd engine each its own connection:
    NBD multi-conn), reported as one group; a list of targets runs numjobs jobs on each, all in
    one group (two servers measured together).  randseed fixes the random offsets, so that a
    second run writes the very blocks the first one did.  end_fsync ends each job with a
    FLUSH (fio's fsync, an NBD FLUSH with the nbd engine): its writes are durable when it
    returns, so what the caller times next does not pay for them."""
    targets = [target] if isinstance(target, Target) else target
    argv = ["fio", f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", *COMMON,
            f"--output={json_out}"]
    if numjobs > 1 or len(targets) > 1:
        argv.append("--group_reporting")
    if randseed is not None:
        argv.append(f"--randseed={randseed}")
    if end_fsync:
        argv.append("--end_fsync=1")
    if seconds is not None:
        argv += ["--time_based", f"--runtime={max(100, round(seconds * 1000))}ms"]
        if ramp_s > 0:
            argv.append(f"--ramp_time={round(ramp_s * 1000)}ms")
    if io_size is not None:
        argv.append(f"--io_size={io_size}")
    if size is not None:
        argv.append(f"--size={size}")
    if iops_log is not None:
        argv += [f"--write_iops_log={iops_log}", f"--log_avg_msec={log_msec}", "--log_unix_epoch=1"]
    # Options before the first --name are global; each --name starts a job section.
    for i, t in enumerate(targets):
        name = w.name if len(targets) == 1 else f"{w.name}-{i}"
        argv += [f"--name={name}", *t.args(), f"--numjobs={numjobs}"]
    return argv


def parse(json_path: str, w: Workload) -> Result:
    try:  # fio may put a message before the JSON ("fio: terminating on signal 2")
        with open(json_path) as f:
            text = f.read()
        data = json.loads(text[text.index("{"):])
    except (OSError, ValueError) as e:
        raise FioError(f"fio wrote no JSON to {json_path}: {e}") from None
    job = data["jobs"][0]
    if job.get("error"):
        raise FioError(f"fio job {job.get('jobname')} failed: error {job['error']}")
    side = job["read"] if w.rw in ("read", "randread") else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return Result(iops=float(side["iops"]), bw_bytes=float(side["bw_bytes"]),
                  ios=int(side["total_ios"]), runtime_s=side["runtime"] / 1000.0,
                  lat_p50_us=pct.get("50.000000", 0) / 1000.0, lat_p99_us=pct.get("99.000000", 0) / 1000.0)


def read_iops_log(prefix: str) -> list[tuple[float, float]]:
    """fio's PREFIX_iops.1.log: `unix ms, IOPS averaged over the window, dir, bs, offset`."""
    out: list[tuple[float, float]] = []
    for path in sorted(glob.glob(f"{prefix}_iops.*.log")):
        with open(path) as f:
            for line in f:
                parts = line.split(",")
                if len(parts) >= 2:
                    out.append((int(parts[0]) / 1000.0, float(parts[1])))
    out.sort()
    return out


def _run(argv: list[str], timeout: float) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise FioError(f"fio exited {proc.returncode}: {' '.join(argv)}\n{out[-2000:]}")


def run(target: Target | list[Target], w: Workload, out_dir: str, tag: str, *, seconds: float | None = None,
        ramp_s: float = 0.0, io_size: int | None = None, size: int | None = None,
        iops_log: bool = False, log_msec: int = 500, timeout: float = 600.0, numjobs: int = 1,
        randseed: int | None = None, end_fsync: bool = False) -> Result:
    """One fio run to the end (numjobs jobs per target, one group); raises FioError if fio fails."""
    json_out = os.path.join(out_dir, f"{tag}.json")
    prefix = os.path.join(out_dir, tag) if iops_log else None
    argv = command(target, w, json_out, seconds=seconds, ramp_s=ramp_s, io_size=io_size, size=size,
                   iops_log=prefix, log_msec=log_msec, numjobs=numjobs, randseed=randseed,
                   end_fsync=end_fsync)
    _run(argv, timeout)
    result = parse(json_out, w)
    if prefix is not None:
        result.log = read_iops_log(prefix)
    return result


class Background:
    """A time-based fio job running while the caller does something (snapshots, a delete)."""

    def __init__(self, target: Target, w: Workload, out_dir: str, tag: str, seconds: float | None = None,
                 *, size: int | None = None, io_size: int | None = None, log_msec: int = 250) -> None:
        self.w = w
        self.json_out = os.path.join(out_dir, f"{tag}.json")
        self.prefix = os.path.join(out_dir, tag)
        argv = command(target, w, self.json_out, seconds=seconds, size=size, io_size=io_size,
                       iops_log=self.prefix, log_msec=log_msec)
        self.seconds = seconds if seconds is not None else 3600.0
        self.started = time.time()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_started(self, settle_s: float = 0.3) -> None:
        """Give fio time to connect and start its I/O (it says nothing until the end: its
        messages go to the --output file, and its logs are written at exit)."""
        time.sleep(max(0.0, self.started + settle_s - time.time()))

    def stop_early(self) -> None:
        """SIGINT: fio ends its jobs and still writes its JSON and logs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float | None = None) -> Result:
        try:
            out, _ = self.proc.communicate(timeout=timeout or self.seconds + 60)
        finally:
            self.kill()
        try:  # stopped early (SIGINT), fio exits non-zero but has written its JSON
            result = parse(self.json_out, self.w)
        except FioError:
            raise FioError(f"background fio exited {self.proc.returncode}: {out[-2000:]}") from None
        result.log = read_iops_log(self.prefix)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(10)


def version() -> str:
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "not installed"
