"""The scheduler in the real server: `serve --clock FILE` moves time through two days in
Europe/Berlin, across the spring DST change (2026-03-29 02:00 -> 03:00) and retention expiries;
automatic snapshots appear, expire and rotate at the quota, seen through the control socket,
while a libnbd client writes and verifies its data; a restart within the hour doubles no slot.

Policy: hours 1, 2, 3 and 12, daily, retain 1d (24 h: across the DST change that is 03:00+02:00
for a 02:00+01:00 slot); vm1's auto quota 4, then 2.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Served, served_store
from waiting import wait_until

from snapdisk import schedule as S
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

nbd = pytest.importorskip("nbd")
BS = 4096
VOL_BYTES = 4 << 20


def set_clock(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)  # the server never reads half a line


def at(s: Served, clock: Path, text: str) -> list[str]:
    """Move the clock to text, wait for the scheduler to act at that time, and return vm1's
    automatic snapshots (names, oldest first)."""
    set_clock(clock, text)
    want = S.parse_instant(text)

    def evaluated() -> bool:
        st: Any = s.call("status")
        now = st["scheduler"]["now"]
        return now is not None and S.parse_instant(now) == want
    wait_until(evaluated, timeout=30, interval=0.05, what=f"the scheduler to evaluate {text}")
    snaps: Any = s.call("snapshot.list", volume="vm1")
    return [x["name"] for x in snaps if x["kind"] == "auto"]


class Writer:
    """A libnbd client writing blocks to vm1 and reading each back, in a thread."""

    def __init__(self, s: Served):
        self.h = s.connect("vm1")
        self.errors: list[str] = []
        self.writes = 0
        self._stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        i = 0
        while not self._stop.is_set():
            off = (i % 256) * BS + 256 * BS  # blocks 256..511; markers live below
            data = (f"w{i:08d}".encode() * (BS // 9 + 1))[:BS]
            try:
                self.h.pwrite(data, off)
                if self.h.pread(BS, off) != data:
                    self.errors.append(f"block {off // BS} write {i} read back differently")
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(f"write {i}: {e}")
                return
            self.writes += 1
            i += 1

    def close(self) -> None:
        self._stop.set()
        self.t.join(30)
        self.h.shutdown()


def marker(k: int) -> bytes:
    return (f"step {k:04d} ".encode() * (BS // 10 + 1))[:BS]


def check_snapshot(s: Served, name: str, upto: int) -> None:
    """vm1@name holds markers 1..upto and not the next one."""
    h = s.connect(f"vm1@{name}")
    try:
        for k in range(1, upto + 2):
            got = h.pread(BS, k * BS)
            assert (got == marker(k)) == (k <= upto), f"{name}: block {k}"
    finally:
        h.shutdown()


def test_policies_in_the_server(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    with Engine.create(store, StoreConfig(pool_bytes=256 << 20, timezone="Europe/Berlin")) as e:
        e.create_volume("vm1", VOL_BYTES)
    clock = tmp_path / "clock"
    set_clock(clock, "2026-03-28T00:59:00+01:00")
    names = {k: f"auto-2026-{v}" for k, v in {
        1: "03-28T01:00+01:00", 2: "03-28T02:00+01:00", 3: "03-28T03:00+01:00",
        4: "03-28T12:00+01:00", 5: "03-29T01:00+01:00", 6: "03-29T03:00+02:00",
        7: "03-29T12:00+02:00", 8: "03-30T01:00+02:00"}.items()}

    with served_store(store, clock=str(clock)) as s:  # type: ignore[arg-type]
        s.call("policy.create", name="p", hours="1,2,3,12", days="daily", retain="1d")
        s.call("policy.apply", name="p", volumes=["vm1"])
        s.call("volume.set", name="vm1", auto_quota=4)
        info: Any = s.call("volume.info", name="vm1")
        assert (info["policy"], info["next_slot"]) == ("p", "2026-03-28T01:00+01:00")
        w = Writer(s)
        live = s.connect("vm1")
        try:
            step = 0

            def write_marker() -> None:
                nonlocal step
                step += 1
                live.pwrite(marker(step), step * BS)

            write_marker()
            assert at(s, clock, "2026-03-28T00:59:59+01:00") == []
            assert at(s, clock, "2026-03-28T01:00:20+01:00") == [names[1]]
            check_snapshot(s, names[1], 1)
            write_marker()
            assert at(s, clock, "2026-03-28T02:00:20+01:00") == [names[1], names[2]]
            check_snapshot(s, names[2], 2)
            write_marker()
            assert at(s, clock, "2026-03-28T03:00:20+01:00") == [names[1], names[2], names[3]]
            write_marker()
            assert at(s, clock, "2026-03-28T12:00:20+01:00") == [names[i] for i in (1, 2, 3, 4)]
            check_snapshot(s, names[4], 4)
            snap: Any = s.call("snapshot.info", volume="vm1", snapshot=names[4])
            assert (snap["kind"], snap["policy"], snap["slot"]) == (
                "auto", "p", "2026-03-28T12:00+01:00")
            assert snap["expires"] == S.parse_instant("2026-03-29T12:00+01:00").timestamp()
        finally:
            w.close()
            live.shutdown()
        assert not w.errors and w.writes > 0

    # Restart within the hour: the 12:00 slot is in the store, not taken again.
    set_clock(clock, "2026-03-28T12:03:00+01:00")
    with served_store(store, clock=str(clock)) as s:  # type: ignore[arg-type]
        w = Writer(s)
        live = s.connect("vm1")
        try:
            assert at(s, clock, "2026-03-28T12:03:00+01:00") == [names[i] for i in (1, 2, 3, 4)]
            assert at(s, clock, "2026-03-28T12:40:00+01:00") == [names[i] for i in (1, 2, 3, 4)]
            # Day two: names[1] expires at the 01:00 slot (24 h), a new one is taken.
            assert at(s, clock, "2026-03-29T01:00:20+01:00") == [names[i] for i in (2, 3, 4, 5)]
            # DST: 02:00 does not exist; slots 2 and 3 are one, at 03:00+02:00, where
            # names[2] (02:00+01:00 + 24 h) expires too.
            assert at(s, clock, "2026-03-29T03:00:20+02:00") == [names[i] for i in (3, 4, 5, 6)]
            # A pure expiry, no slot: names[3] (03:00+01:00 + 24 h = 04:00+02:00).
            assert at(s, clock, "2026-03-29T03:59:50+02:00") == [names[i] for i in (3, 4, 5, 6)]
            assert at(s, clock, "2026-03-29T04:00:10+02:00") == [names[i] for i in (4, 5, 6)]
            # The quota: 2 now; the 12:00 slot first deletes the oldest two.
            s.call("volume.set", name="vm1", auto_quota=2)
            assert at(s, clock, "2026-03-29T12:00:20+02:00") == [names[6], names[7]]
            assert at(s, clock, "2026-03-30T01:00:20+02:00") == [names[7], names[8]]
            # A slot missed (the clock jumps past its grace) is not taken late.
            assert at(s, clock, "2026-03-30T02:30:00+02:00") == [names[7], names[8]]
            pol: Any = s.call("policy.info", name="p")
            assert pol["volumes"] == ["vm1"] and pol["next_slot"] == "2026-03-30T03:00+02:00"
            vol: Any = s.call("volume.info", name="vm1")
            assert (vol["snapshots_auto"], vol["auto_quota"]) == (2, 2)
            for k in range(1, 5):
                assert live.pread(BS, k * BS) == marker(k)
        finally:
            w.close()
            live.shutdown()
        assert not w.errors and w.writes > 0
        check: Any = s.call("check")
        assert check["ok"], check


def test_clock_start_time(tmp_path: Path) -> None:
    """The status op shows the scheduler's clock: the time in the file, not the system's."""
    store = str(tmp_path / "store")
    with Engine.create(store, StoreConfig(pool_bytes=64 << 20, timezone="UTC")):
        pass
    clock = tmp_path / "clock"
    set_clock(clock, "2031-01-01T00:00:00+00:00")
    with served_store(store, clock=str(clock)) as s:  # type: ignore[arg-type]
        st: Any = wait_until(lambda: s.call("status")["scheduler"]["now"],  # type: ignore[index]
                             timeout=30, what="a first evaluation")
        assert S.parse_instant(st) == datetime.fromisoformat("2031-01-01T00:00:00+00:00")
