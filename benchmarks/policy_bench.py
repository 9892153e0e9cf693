"""Scenario: automatic snapshots do not disturb I/O (issue 12).

A volume gets a policy of every hour of every day (retention one day), and the server runs
with `serve --clock FILE` while a thread advances that clock by an hour each second: the
scheduler takes one automatic snapshot a second and, once a simulated day has passed, deletes
one a second too (retention).  4 KiB random writes run beside it; the ratio is their throughput
against the same run with no policy applied (the clock still advancing), in the same round.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Iterator
from typing import Any

from benchmarks import fio, peers
from benchmarks.report_base import Doc, Target


class ClockFile:
    """A `--clock` file advanced by `step` every `every_s` seconds in a thread."""

    def __init__(self, path: str, start: dt.datetime, step: dt.timedelta, every_s: float) -> None:
        self.path, self.now, self.step, self.every_s = path, start, step, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.write()

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.now.isoformat() + "\n")
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.now += self.step
            self.write()

    def __enter__(self) -> ClockFile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _served(store: str, clock: str) -> Iterator[Any]:
    from snapdisk import daemon
    info = daemon.serve(store, clock=clock, timeout=60)
    peers.STARTED.append(info.pid)
    try:
        yield info
    finally:
        with contextlib.suppress(Exception):
            daemon.stop(store, timeout=10)
        peers.kill_pid(info.pid)


def policy_every_hour(lab: Any) -> dict[str, Any]:
    """Rows per round: fio 4 KiB random writes with no policy, then with the hourly policy
    (the clock one hour a second), and the automatic snapshots seen at the end."""
    from snapdisk.control.client import Client
    s = lab.s
    store = lab.store(0)
    region = min(s.live_region, s.size)
    w = fio.WORKLOADS["randwrite"]
    clock_path = lab.path("policy-clock")
    rows: list[dict[str, Any]] = []
    start = dt.datetime(2026, 3, 28, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    for r in range(s.rounds):
        with ClockFile(clock_path, start, dt.timedelta(hours=1), 1.0), \
                _served(store, clock_path) as info:
            tgt = peers.Target(uri=info.uri(peers.EXPORT))
            with Client(info.control_socket, timeout=120) as c:
                c.call("policy.remove", volumes=[peers.EXPORT])
                none = fio.run(tgt, w, lab.fio_dir, f"pol-r{r}-none", seconds=s.live_seconds,
                               size=region)
                if not any(p["name"] == "every-hour" for p in c.call("policy.list")):
                    c.call("policy.create", name="every-hour", hours="0-23",
                           days="daily", retain="1d")
                c.call("policy.apply", name="every-hour", volumes=[peers.EXPORT])
                pol = fio.run(tgt, w, lab.fio_dir, f"pol-r{r}-policy", seconds=s.live_seconds,
                              size=region)
                c.call("policy.remove", volumes=[peers.EXPORT])
                autos = [x for x in c.call("snapshot.list", volume=peers.EXPORT)
                         if x.get("kind") == "auto"]
        rows.append({"round": r, "none_iops": none.iops, "policy_iops": pol.iops,
                     "auto_snapshots": len(autos)})
    return {"seconds": s.live_seconds, "region_bytes": region, "rows": rows}


def section_policy(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    rows = d["rows"]
    ratios = [r["policy_iops"] / r["none_iops"] for r in rows if r["none_iops"]]
    doc("## 9. Automatic snapshots by policy", "",
        f"A policy of every hour of every day (retention one day) on the volume, the server's clock "
        f"(`serve --clock FILE`) advanced an hour a second, so the scheduler takes an automatic "
        f"snapshot every second (and, past a simulated day, deletes one a second); 4 KiB random "
        f"writes at QD16 for {d['seconds']} s beside it, against the same run without the policy "
        f"(clock still advancing), in the same round.", "")
    doc.table(["round", "IOPS without policy", "IOPS with policy", "ratio", "automatic snapshots"],
              [[str(r["round"]), f"{r['none_iops']:,.0f}", f"{r['policy_iops']:,.0f}",
                f"{r['policy_iops'] / r['none_iops']:.2f}" if r["none_iops"] else "-",
                str(r["auto_snapshots"])] for r in rows], align="rrrrr")
    doc("")
    targets.append(Target("4 KiB random write with a policy snapshotting every (simulated) hour, "
                          "an hour a second / no policy", ratios, lo=0.97,
                          note=f"{sum(r['auto_snapshots'] for r in rows)} automatic snapshots "
                               "left at the ends of the rounds"))
