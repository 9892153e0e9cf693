"""The benchmark suite in --quick mode (tiny sizes, one round), so that it never rots: every
scenario runs, the report has each scenario's table, the plots exist, results.json holds numbers,
and no server it started is left running.  Not `slow`: it is part of the default selection
(about a minute and a half on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peers, scenarios

pytestmark = pytest.mark.bench_quick
ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("fio", "nbdkit", "qemu-img", "qemu-nbd", "qemu-storage-daemon")
SECTIONS = ["## Targets", "## Why, and the next step", "## 1. Steady state",
            "## 2. First writes after a snapshot", "## 3. A snapshot every second", "## 4. Snapshot latency",
            "## 5. Rollback and snapshot delete",
            "## 6. Server memory", "## 7. The C core", "## 8. More than one connection",
            "## 9. Automatic snapshots by policy"]
PNGS = ["steady_state.png", "first_writes.png", "live_snapshots.png", "snapshot_latency.png",
        "rollback_delete.png", "rss.png", "core.png", "multi_conn.png"]
# issue 9's targets, each a row of the targets table (with a measured number, not "not measured")
TARGETS = ["A snapshot every second under 4 KiB random writes: throughput / with none",
           "A snapshot every second: worst 250 ms after a snapshot",
           "First 4 KiB random writes right after a snapshot / the in-place steady state",
           "First 4 KiB random writes right after a snapshot: snapdisk / qcow2",
           "Snapshot create under fio load: p99", "Snapshot create under fio load: max",
           "Snapshot delete: seconds per changed GiB", "Rollback: seconds per changed GiB",
           "4 KiB random read IOPS while a snapshot delete runs / before it",
           "RssAnon flat", "LMDB map pages reclaimable",
           "4 KiB random write with a policy snapshotting every (simulated) hour"]


def _numbers(x: object) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return []


def _ours(root: Path) -> list[str]:
    """Processes whose command line names our work or output directory."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd and peers.alive(int(pid)):
            found.append(f"{pid}: {cmd[:200]}")
    return found


def test_quick_run(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)} (scripts/setup installs them)")
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e .[bench])")
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                           "--workdir", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    assert set(results["scenarios"]) == set(scenarios.SCENARIOS)
    for name, data in results["scenarios"].items():
        nums = _numbers(data)
        assert nums and any(n > 0 for n in nums), f"{name}: no positive number in its results"
    steady = results["scenarios"]["steady"]["rows"]
    assert steady and all(r["iops"] > 0 and r["bw_bytes"] > 0 for r in steady)
    assert all(r["iops"] > 0 for r in results["scenarios"]["first-writes"]["rows"])
    assert results["scenarios"]["rss"]["max"]["VmRSS"] > 0
    assert results["scenarios"]["core"]["rows"]

    mc = results["scenarios"]["multi-conn"]
    for peer in ("nbdkit-file", "passthrough-requests", "snapdisk"):
        for w in ("randread", "randwrite"):
            got = {r["conns"]: r for r in mc["rows"] if r["peer"] == peer and r["workload"] == w}
            assert set(got) == set(mc["conns"]) == {1, 2, 4}, (peer, w, sorted(got))
            assert all(r["iops"] > 0 and r["server_cores"] > 0 and r["machine_cores"] > 0
                       for r in got.values()), (peer, w)
    assert [r for r in mc["rows"] if r["procs"] == 2 and r["iops"] > 0]
    assert all(r["inplace"]["iops"] > 0 for r in results["scenarios"]["first-writes"]["rows"]
               if r["peer"] == "snapdisk")
    pol = results["scenarios"]["policy"]["rows"]
    assert pol and all(r["none_iops"] > 0 and r["policy_iops"] > 0 for r in pol), pol
    assert any(r["auto_snapshots"] > 0 for r in pol), "the scheduler took no automatic snapshot"
    rss = results["scenarios"]["rss"]
    assert rss["maps_before"] and any(v["Rss"] > 0 for v in rss["maps_before"].values()), rss["maps_before"]

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for what in TARGETS:
        hit = [line for line in rows if what in line]
        assert hit, f"targets table lacks {what!r}"
        assert "PASS" in hit[0] or "MISS" in hit[0], hit[0]
    assert "What limits scaling" in report and "Two passthrough processes" in report
    for section in SECTIONS:
        assert section in report, f"report lacks {section!r}"
    assert "PASS" in report or "MISS" in report
    for png in PNGS:
        path = out / png
        assert path.exists() and path.stat().st_size > 1000, f"{png} missing or empty"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    assert results["pids"], "no server was started"
    left = [pid for pid in results["pids"] if peers.alive(pid)]
    assert not left, f"servers left running: {left}"
    assert not _ours(tmp_path), _ours(tmp_path)
    assert not work.exists(), "the work directory was not removed"
