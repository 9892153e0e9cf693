"""Run the benchmark suite and write its report: `scripts/bench` calls this.

    python -m benchmarks.run [--quick] [--out DIR] [--workdir DIR] [--rounds N] [--seconds S]
                             [--rss-gib G] [--only SCENARIO,...] [--keep]
    python -m benchmarks.run --report-only OUT/results.json    # the report again, nothing measured

Writes OUT/report.md, OUT/*.png and OUT/results.json (every number the report shows, and the
pids of every server it started).  The full run's OUT is benchmarks/ (the committed report);
--quick (tiny sizes, one round, seconds in all) writes to a temporary directory unless --out
is given, and is what benchmarks/test_bench_quick.py runs.

The whole run holds an exclusive flock on /tmp/snapdisk-bench.lock, so that two measurement
runs on this machine (this one, a colleague's `flock /tmp/snapdisk-bench.lock fio ...`) never
overlap.  Exit status: 0 if every scenario ran and no server was left behind, else 1 (the
report still shows what ran and each scenario's error).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any

from benchmarks import peers, report, scenarios, sysinfo

LOCK = "/tmp/snapdisk-bench.lock"
HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = ["fio", "nbdkit", "qemu-img", "qemu-nbd", "qemu-storage-daemon"]  # fincore: optional


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks the suite runs")
    ap.add_argument("--out", help="where report.md, the PNGs and results.json go "
                                  "(default: benchmarks/, or a temporary directory with --quick)")
    ap.add_argument("--workdir", help="backing files, stores, servers' logs, fio output (default "
                                      "/var/tmp/snapdisk-bench; emptied first if the suite made it, "
                                      "removed after unless --keep)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 3)")
    ap.add_argument("--seconds", type=float, help="length of one steady-state fio run (default 3)")
    ap.add_argument("--rss-gib", type=float, help="scenario 6: GiB of random 4 KiB blocks written "
                                                  "(default 16, issue 9's figure; --quick: 64 MiB)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ",".join(scenarios.SCENARIOS))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--report-only", metavar="RESULTS_JSON",
                    help="measure nothing: rewrite the report (in --out, default beside the file) from a "
                         "results.json")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> scenarios.Settings:
    workdir = args.workdir or ("/var/tmp/snapdisk-bench-quick" if args.quick else "/var/tmp/snapdisk-bench")
    s = scenarios.Settings.quick_mode(workdir) if args.quick else scenarios.Settings(workdir=workdir)
    s.keep = args.keep
    if args.rounds:
        s.rounds = args.rounds
    if args.seconds:
        s.seconds = args.seconds
    if args.rss_gib:
        s.rss_written = int(args.rss_gib * (1 << 30)) // 4096 * 4096
    return s


def selected(only: str | None) -> list[str]:
    if not only:
        return list(scenarios.SCENARIOS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}: choose from {', '.join(scenarios.SCENARIOS)}")
    return [n for n in scenarios.SCENARIOS if n in names]


def _ancestors() -> set[int]:
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _holders(path: str) -> set[int]:
    """Pids holding a flock on path (from /proc/locks)."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    out.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    return out


def take_lock() -> int | None:
    """The exclusive flock on LOCK for the whole run; None if one of our ancestors already holds
    it (`flock /tmp/snapdisk-bench.lock scripts/bench`), which would otherwise deadlock."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        if _holders(LOCK) & _ancestors():
            os.close(fd)
            return None
    print(f"bench: waiting for {LOCK} (another measurement is running)", file=sys.stderr, flush=True)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _save(out: str, results: dict[str, Any]) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that every finally stops its servers


def rewrite_report(results_json: str, out: str | None) -> int:
    with open(results_json) as f:
        results = json.load(f)
    path = report.write(out or os.path.dirname(os.path.abspath(results_json)), results)
    print(f"bench: report in {path}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return rewrite_report(args.report_only, args.out)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)} (run scripts/setup)", file=sys.stderr)
        return 2
    s = settings_from(args)
    names = selected(args.only)
    out = args.out or (tempfile.mkdtemp(prefix="snapdisk-bench-report-") if s.quick else HERE)
    os.makedirs(out, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    lock = take_lock()
    results: dict[str, Any] = {"settings": s.to_dict(), "scenarios": {}, "errors": {}, "seconds": {}}
    t_start = time.monotonic()
    try:
        results["machine"] = sysinfo.machine(s.workdir)
        lab = scenarios.Lab(s)
        try:
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                results.setdefault("code", {})[name] = sysinfo.code_version()
                t0 = time.monotonic()
                try:
                    results["scenarios"][name] = scenarios.SCENARIOS[name](lab)
                except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: report what ran, stop
                    results["errors"][name] = f"interrupted ({e or 'SIGINT'})"
                    break
                except Exception:
                    results["errors"][name] = traceback.format_exc()
                    print(f"bench: {name} failed:\n{results['errors'][name]}", file=sys.stderr, flush=True)
                    lab.stop_all()
                finally:
                    results["seconds"][name] = round(time.monotonic() - t0, 1)
                    results["prep_seconds"] = lab.prep_seconds
                    _save(out, results)  # so that a crash later still leaves the data
                print(f"bench: {name} done in {results['seconds'][name]} s", file=sys.stderr, flush=True)
        finally:
            lab.close()
    finally:
        if lock is not None:
            os.close(lock)
    results["total_seconds"] = round(time.monotonic() - t_start, 1)
    results["finished_at"] = time.time()
    results["machine"]["loadavg_end"] = sysinfo.loadavg()
    results.setdefault("code", {})["end"] = sysinfo.code_version()
    results["pids"] = list(peers.STARTED)
    results["leftovers"] = peers.leftovers()
    _save(out, results)
    report.write(out, results)
    print(f"bench: report in {os.path.join(out, 'report.md')} ({results['total_seconds']} s)",
          file=sys.stderr)
    if results["leftovers"]:
        print(f"bench: servers left running: {results['leftovers']}", file=sys.stderr)
    return 1 if results["errors"] or results["leftovers"] else 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
