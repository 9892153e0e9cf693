"""Policies, quotas and options in the store (snapdisk.policies), their control ops and CLI
commands, and the scheduler's actions on an engine (snapdisk.scheduler) without a server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from snapdisk import errors
from snapdisk import schedule as S
from snapdisk.cli import main
from snapdisk.control.ops import dispatch
from snapdisk.engine import Engine
from snapdisk.exportspec import ExportSpec
from snapdisk.scheduler import Clock, Scheduler
from snapdisk.store import StoreConfig


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.create(str(tmp_path / "s"), StoreConfig(pool_bytes=64 << 20,
                                                        timezone="Asia/Shanghai")) as e:
        e.create_volume("vm1", 1 << 20)
        e.create_volume("vm2", 1 << 20)
        yield e


def call(e: Engine, op: str, **args: Any) -> Any:
    return dispatch(e, op, args)


def test_policy_ops(engine: Engine) -> None:
    engine.policies.clock = lambda: S.parse_instant("2026-11-25T11:00:00+08:00")
    p = call(engine, "policy.create", name="six", hours="0,6,12,18", days="mon-fri",
             retain="7d")
    assert (p["hours"], p["days"], p["retain"], p["next_slot"]) == (
        [0, 6, 12, 18], ["mon", "tue", "wed", "thu", "fri"], "7d", "2026-11-25T12:00+08:00")
    with pytest.raises(errors.AlreadyExists):
        call(engine, "policy.create", name="six", hours="1", days="daily", retain="1d")
    p = call(engine, "policy.apply", name="six", volumes=["vm1", "vm2"])
    assert (p["volumes"], p["volume_count"]) == (["vm1", "vm2"], 2)
    v = call(engine, "volume.info", name="vm1")
    assert (v["policy"], v["next_slot"]) == ("six", "2026-11-25T12:00+08:00")
    p = call(engine, "policy.update", name="six", retain="forever", days="sat-sun")
    assert (p["retain"], p["days"], p["next_slot"]) == (
        "forever", ["sat", "sun"], "2026-11-28T00:00+08:00")
    assert [x["name"] for x in call(engine, "policy.list")] == ["six"]
    assert call(engine, "policy.remove", volumes=["vm2"]) == {"removed": {"vm2": "six"}}
    assert call(engine, "policy.info", name="six")["volumes"] == ["vm1"]
    r = call(engine, "policy.delete", name="six")
    assert r["volumes"] == ["vm1"] and call(engine, "policy.list") == []
    assert call(engine, "volume.info", name="vm1")["policy"] is None


@pytest.mark.parametrize("op,args,named", [
    ("policy.create", {"hours": "24", "days": "daily", "retain": "1d"}, "'24'"),
    ("policy.create", {"hours": "1", "days": "funday", "retain": "1d"}, "'funday'"),
    ("policy.create", {"hours": "1", "days": "daily", "retain": "0"}, "'0'"),
    ("policy.create", {"hours": "1", "days": "daily", "retain": "65537"}, "'65537'"),
    ("policy.apply", {"volumes": ["vm1"]}, "'nope'"),
    ("policy.info", {}, "'nope'"),
])
def test_bad_input_names_the_value(engine: Engine, op: str, args: dict[str, Any],
                                   named: str) -> None:
    with pytest.raises(errors.SnapdiskError) as e:
        call(engine, op, name="nope", **args)
    assert named in str(e.value)
    call(engine, "policy.create", name="p", hours="1", days="daily", retain="1d")
    with pytest.raises(errors.VolumeNotFound, match="'ghost'"):
        call(engine, "policy.apply", name="p", volumes=["vm1", "ghost"])
    assert call(engine, "volume.info", name="vm1")["policy"] is None  # all or nothing


def test_config_and_quotas(engine: Engine) -> None:
    c = call(engine, "config.set", key="timezone", value="America/New_York")
    assert c["timezone"] == "America/New_York"
    with pytest.raises(errors.InvalidArgument, match="Mars/Base"):
        call(engine, "config.set", key="timezone", value="Mars/Base")
    with pytest.raises(errors.InvalidArgument, match="pool"):
        call(engine, "config.set", key="pool", value=1)
    call(engine, "config.set", key="manual-snapshot-quota", value=3)
    call(engine, "volume.set", name="vm1", manual_quota=1)
    engine.create_snapshot("vm1", "a")
    with pytest.raises(errors.QuotaExceeded, match="volume set vm1 --manual-quota"):
        engine.create_snapshot("vm1", "b")
    for n in "abc":
        engine.create_snapshot("vm2", n)
    with pytest.raises(errors.QuotaExceeded, match="the quota is 3"):
        engine.create_snapshot("vm2", "d")
    call(engine, "volume.set", name="vm1", auto_quota=2)
    for n in ("x", "y", "z"):
        engine.create_snapshot("vm1", n, kind="auto")
    assert [s.name for s in engine.list_snapshots("vm1")] == ["a", "y", "z"]
    u = call(engine, "usage", volume="vm1")["volumes"][0]
    assert (u["snapshots_manual"], u["manual_quota"], u["snapshots_auto"], u["auto_quota"]) == (
        1, 1, 2, 2)


def test_options_are_kept_in_the_store(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with Engine.create(path, StoreConfig(pool_bytes=64 << 20)) as e:
        assert e.policies.zone_name() == S.local_zone_name()  # none given: the local zone
        e.create_volume("vm1", 1 << 20)
        call(e, "config.set", key="timezone", value="America/New_York")
        call(e, "config.set", key="manual-snapshot-quota", value=3)
        call(e, "volume.set", name="vm1", manual_quota=1)
        call(e, "policy.create", name="p", hours="1", days="daily", retain="1d")
        call(e, "policy.apply", name="p", volumes=["vm1"])
    with Engine.open(path) as e:
        assert e.policies.config_get()["timezone"] == "America/New_York"
        assert e.policies.volume_view("vm1")["manual_quota"] == 1
        assert e.config.manual_snapshot_quota == 3
        assert e.policies.volume_view("vm1")["policy"] == "p"
        assert e.check().ok


def test_auto_snapshot_names_are_exportable() -> None:
    spec = ExportSpec.parse("vm1@auto-2026-11-25T12:00+08:00")
    assert spec.snapshot == "auto-2026-11-25T12:00+08:00"
    with pytest.raises(errors.InvalidName):
        ExportSpec.parse("vm1:x")  # volume names stay as they were


def test_scheduler_on_an_engine(engine: Engine, tmp_path: Path) -> None:
    """Take, restart, expire; a deleted policy's snapshots keep their retention."""
    clock = tmp_path / "clock"
    clock.write_text("2026-11-25T11:59:00+08:00\n")
    sched = Scheduler(engine, Clock(str(clock)))
    engine.policies.clock = sched.clock.now
    call(engine, "policy.create", name="noon", hours="12", days="daily", retain="2d")
    call(engine, "policy.apply", name="noon", volumes=["vm1"])

    def at(text: str) -> list[str]:
        clock.write_text(text + "\n")
        sched.evaluate(sched.clock.now())
        return [s.name for s in engine.list_snapshots("vm1")]

    assert at("2026-11-25T11:59:59+08:00") == []
    assert at("2026-11-25T12:00:00+08:00") == ["auto-2026-11-25T12:00+08:00"]
    s = engine.snapshot_info("vm1", "auto-2026-11-25T12:00+08:00")
    assert (s.kind, s.policy, s.slot) == ("auto", "noon", "2026-11-25T12:00+08:00")
    again = Scheduler(engine, Clock(str(clock)))  # a restarted server
    clock.write_text("2026-11-25T12:04:00+08:00\n")
    assert again.evaluate(again.clock.now()) == []
    engine.create_snapshot("vm1", "mine")  # manual: never deleted by the scheduler
    assert at("2026-11-26T12:00:30+08:00") == ["auto-2026-11-25T12:00+08:00", "mine",
                                               "auto-2026-11-26T12:00+08:00"]
    call(engine, "policy.delete", name="noon")
    assert at("2026-11-27T11:59:59+08:00") == ["auto-2026-11-25T12:00+08:00", "mine",
                                               "auto-2026-11-26T12:00+08:00"]
    assert at("2026-11-27T12:00:00+08:00") == ["mine", "auto-2026-11-26T12:00+08:00"]
    assert at("2026-11-28T12:00:00+08:00") == ["mine"]
    assert at("2099-01-01T00:00:00+08:00") == ["mine"]
    assert engine.check().ok


def test_clock_file_errors_keep_the_last_time(tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-03-29T01:59:30+01:00\n")
    c = Clock(str(clock))
    first = c.now()
    assert first == datetime.fromisoformat("2026-03-29T01:59:30+01:00")
    clock.write_text("not a time\n")
    assert c.now() == first
    clock.unlink()
    assert c.now() == first


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    assert main(["--store", store, "init", "--pool-size", "64M", "--timezone", "UTC"]) == 0
    assert main(["--store", store, "volume", "create", "web", "1M"]) == 0
    capsys.readouterr()
    assert main(["--store", store, "--json", "policy", "create", "office", "--hours", "9,13",
                 "--days", "mon-fri", "--retain", "30d"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == (
        "hours 9,13, days mon-fri, retain 30d")
    assert main(["--store", store, "policy", "apply", "office", "web"]) == 0
    assert main(["--store", store, "policy", "info", "office"]) == 0
    assert "web" in capsys.readouterr().out
    assert main(["--store", store, "volume", "set", "web", "--auto-quota", "5"]) == 0
    assert main(["--store", store, "config", "set", "auto-snapshot-quota", "9"]) == 0
    assert main(["--store", store, "--json", "config", "get", "timezone"]) == 0
    capsys.readouterr()
    for argv, code, text in [
            (["policy", "create", "x", "--hours", "24", "--retain", "1d"], 2, "'24'"),
            (["policy", "update", "x", "--retain", "1d"], 3, "no policy named 'x'"),
            (["volume", "set", "web", "--manual-quota", "-1"], 2, "0-1048576")]:
        with pytest.raises(SystemExit) as e:
            main(["--store", store, *argv])
        assert e.value.code == code and text in capsys.readouterr().err
    assert main(["--store", store, "policy", "delete", "office"]) == 0


class BusyRegistry:
    """Connections where a client holds the snapshot with id `held`."""

    def __init__(self, held: int):
        self.held = held

    @contextlib.contextmanager
    def reserve(self, vol: int, what: str, *, live_only: bool = False,
                epoch: int | None = None, force: bool = False) -> Iterator[int]:
        if epoch == self.held:
            raise errors.Busy(f"cannot {what}: a client has it open")
        yield 0


def test_scheduler_never_deletes_under_a_client(engine: Engine, tmp_path: Path) -> None:
    """Retention and the quota skip a snapshot a client has open (and take nothing in its
    place) until the client is gone."""
    clock = tmp_path / "clock"
    clock.write_text("2026-11-25T12:00:10+08:00\n")
    engine.policies.clock = lambda: S.parse_instant("2026-11-25T00:00:00+08:00")
    call(engine, "policy.create", name="noon", hours="0,12", days="daily", retain="1d")
    call(engine, "policy.apply", name="noon", volumes=["vm1"])
    call(engine, "volume.set", name="vm1", auto_quota=1)
    free = Scheduler(engine, Clock(str(clock)))
    free.evaluate(free.clock.now())
    held = engine.snapshot_id("vm1", "auto-2026-11-25T12:00+08:00")
    busy = Scheduler(engine, Clock(str(clock)), BusyRegistry(held))
    clock.write_text("2026-11-26T00:00:10+08:00\n")
    done = busy.evaluate(busy.clock.now())
    assert [d.get("error") for d in done] == ["busy", "busy"]
    assert [s.name for s in engine.list_snapshots("vm1")] == ["auto-2026-11-25T12:00+08:00"]
    clock.write_text("2026-11-26T00:01:00+08:00\n")  # the client is gone, within the grace
    free.evaluate(free.clock.now())
    assert [s.name for s in engine.list_snapshots("vm1")] == ["auto-2026-11-26T00:00+08:00"]
    clock.write_text("2026-11-26T12:00:00+08:00\n")
    busy = Scheduler(engine, Clock(str(clock)),
                     BusyRegistry(engine.snapshot_id("vm1", "auto-2026-11-26T00:00+08:00")))
    busy.evaluate(busy.clock.now())
    assert [s.name for s in engine.list_snapshots("vm1")] == ["auto-2026-11-26T00:00+08:00"]
