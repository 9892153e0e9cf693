"""The report's arithmetic on made-up results (no server, no fio): the issue 9 figures are
computed the way the report says, and fio's argv for several connections is what fio needs."""

from __future__ import annotations

import pytest

from benchmarks import fio, scenarios

pytest.importorskip("matplotlib")

from benchmarks import report_multiconn, report_snapshots  # noqa: E402


def test_worst_250ms_after_a_snapshot_counts_only_the_windows_after_each_snapshot() -> None:
    none_log = [(float(t), 1000.0) for t in range(10)]
    # windows end at .25, .5, ...; a snapshot at t=2.0: windows ending in (2.0, 2.5) count
    snap_log = [(2.0 + 0.25 * i, v) for i, v in enumerate([100.0, 900.0, 700.0, 950.0])]
    row = {"none_log": none_log, "snap_log": snap_log, "snapshots": [(2.0, 0.001)]}
    # a window counts if it overlaps [t, t + 0.25], i.e. ends in (t, t + 0.5): the 100 ending at
    # 2.0 does not (it was before the snapshot), nor the 700 ending at 2.5; the 900 at 2.25 does
    assert report_snapshots.worst_after_snapshot(row) == pytest.approx(0.9)
    row["snapshots"] = [(2.0, 0.001), (2.3, 0.001)]  # windows ending at 2.5 and 2.75 count too
    assert report_snapshots.worst_after_snapshot(row) == pytest.approx(0.7)
    assert report_snapshots.worst_after_snapshot({**row, "none_log": []}) is None


def test_phases_only_when_every_reply_has_them() -> None:
    assert scenarios._phases([{"gate_wait_ms": 0.5, "commit_ms": 1}, {"gate_wait_ms": 2, "commit_ms": 3.5}]) \
        == {"gate_wait_ms": [0.5, 2.0], "commit_ms": [1.0, 3.5]}
    assert scenarios._phases([{"name": "a"}, {"name": "b"}]) == {}
    assert scenarios._phases([{"commit_ms": 1.0}, {}]) == {}
    assert scenarios._phases([None, None]) == {}  # qemu-storage-daemon's snapshots reply nothing
    assert scenarios._phases([]) == {}


def test_fio_argv_for_connections_and_two_servers() -> None:
    w = fio.WORKLOADS["randread"]
    a, b = fio.Target(uri="nbd+unix:///v?socket=/a"), fio.Target(uri="nbd+unix:///v?socket=/b")
    one = fio.command(a, w, "/o.json", seconds=1, numjobs=4)
    assert one.count("--numjobs=4") == 1 and "--group_reporting" in one
    # global options come before the first job section, so they apply to every job
    assert one.index("--rw=randread") < one.index("--name=randread") < one.index("--uri=nbd+unix:///v?socket=/a")
    two = fio.command([a, b], w, "/o.json", seconds=1, numjobs=2)
    assert two.count("--numjobs=2") == 2 and "--group_reporting" in two
    assert two.index("--name=randread-0") < two.index("--uri=nbd+unix:///v?socket=/a") \
        < two.index("--name=randread-1") < two.index("--uri=nbd+unix:///v?socket=/b")
    plain = fio.command(a, w, "/o.json", io_size=4096, randseed=7)
    assert "--group_reporting" not in plain and "--numjobs=1" in plain and "--randseed=7" in plain


def _row(peer: str, w: str, c: int, iops: float, rnd: int = 0, **cpu: float) -> dict[str, object]:
    return {"round": rnd, "workload": w, "peer": peer, "conns": c, "procs": 1, "iops": iops, **cpu}


def test_scaling_is_per_round_and_the_limit_is_read_from_the_cpu_figures() -> None:
    rows = [_row("p", "randread", 1, 100, 0), _row("p", "randread", 4, 150, 0),
            _row("p", "randread", 1, 200, 1), _row("p", "randread", 4, 200, 1)]
    assert report_multiconn.scaling(rows, "p", "randread", 4) == [1.5, 1.0]
    cpu = dict(hot_thread_cores=0.3, fio_cores=0.4, other_cores=0.1)
    gil = [_row("p", "randread", 4, 1, server_cores=1.3, server_user_cores=0.95, machine_cores=1.8, **cpu)]
    assert "interpreter-bound" in report_multiconn.limit_text(gil, "p", "randread", 4, 2)
    full = [_row("p", "randread", 4, 1, server_cores=1.3, server_user_cores=0.6, machine_cores=1.95, **cpu)]
    assert "machine-bound" in report_multiconn.limit_text(full, "p", "randread", 4, 2)
    busy = [_row("p", "randread", 4, 1, server_cores=0.5, server_user_cores=0.3, machine_cores=1.95,
                 **{**cpu, "other_cores": 1.0})]
    assert "neither server nor fio" in report_multiconn.limit_text(busy, "p", "randread", 4, 2)
    idle = [_row("p", "randread", 4, 1, server_cores=0.5, server_user_cores=0.3, machine_cores=1.0, **cpu)]
    assert "the limit is elsewhere" in report_multiconn.limit_text(idle, "p", "randread", 4, 2)
    assert report_multiconn.limit_text([], "p", "randread", 4, 2) == "not measured"
