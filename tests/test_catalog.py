"""Names and ids at the engine level: hostile input is a clear error, never an internal one
(issue 10 items 8 and 9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import errors
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

MiB = 1 << 20


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=16 * MiB))
    e.create_volume("w", MiB)
    e.create_snapshot("w", "s")
    yield e
    e.close()


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "a\nb", "\nabc"])
def test_names_with_newlines_are_refused_everywhere(engine: Engine, name: str) -> None:
    with pytest.raises(errors.InvalidName):
        engine.create_volume(name, MiB)
    with pytest.raises(errors.InvalidName):
        engine.create_snapshot("w", name)
    with pytest.raises(errors.InvalidName):
        engine.clone("w", "s", name)
    assert [v.name for v in engine.list_volumes()] == ["w"]


@pytest.mark.parametrize("snap", ["99999999999999999999999", "18446744073709551616", "²", "1²",
                                  "١", "-1", "+1", " 1", "1 ", -1, 1 << 64, 10 ** 30, True])
def test_snapshot_ids_out_of_range_are_not_found(engine: Engine, snap: str | int) -> None:
    for call in (lambda: engine.snapshot_info("w", snap), lambda: engine.snapshot_id("w", snap),
                 lambda: engine.delete_snapshot("w", snap), lambda: engine.rollback("w", snap),
                 lambda: engine.clone("w", snap, "c")):
        with pytest.raises(errors.SnapshotNotFound):
            call()
    assert engine.check().ok


def test_snapshot_ids_in_range_still_work(engine: Engine) -> None:
    sid = engine.snapshot_id("w", "s")
    assert engine.snapshot_info("w", sid).name == "s"
    assert engine.snapshot_info("w", str(sid)).name == "s"
    with pytest.raises(errors.SnapshotNotFound):
        engine.snapshot_info("w", (1 << 64) - 1)  # the largest id the format has: not there


@pytest.mark.parametrize("name", ["\ud800", "a\udcff"])
def test_unencodable_names_are_invalid(engine: Engine, name: str) -> None:
    with pytest.raises(errors.InvalidName):
        engine.volume_info(name)
    with pytest.raises(errors.InvalidName):
        engine.snapshot_info("w", name)
    with pytest.raises(errors.InvalidName):
        engine.create_volume(name, MiB)
    with pytest.raises(errors.InvalidName):
        engine.delete_volume(name)


def test_unknown_names_are_not_found(engine: Engine) -> None:
    with pytest.raises(errors.VolumeNotFound):
        engine.volume_info("nope")
    with pytest.raises(errors.VolumeNotFound):
        engine.volume_info("w\n")  # looked up as is: not a name of this store
    with pytest.raises(errors.SnapshotNotFound):
        engine.snapshot_info("w", "nope")
