"""Long operations report progress and can be cancelled with nothing changed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from snapdisk import errors
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig

BS = BLOCK_SIZE
MiB = 1 << 20


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=64 * MiB))
    v = e.create_volume("v", 8 * MiB).id
    for b in range(0, 2048, 2):  # scattered: one record per block
        e.write(v, b * BS, bytes([b % 250 + 1]) * BS)
    e.create_snapshot("v", "s1")
    for b in range(0, 2048, 2):
        e.write(v, b * BS, b"x" * BS)
    e.create_snapshot("v", "s2")
    yield e
    e.close()


def state(e: Engine) -> Any:
    return (e.usage(), [v.to_dict() for v in e.list_volumes()],
            e.read(e.volume_id("v"), 0, 8 * MiB) if "v" in [x.name for x in e.list_volumes()]
            else None)


OPS: dict[str, Callable[..., Any]] = {
    "delete_snapshot": lambda e, **kw: e.delete_snapshot("v", "s1", **kw),
    "rollback": lambda e, **kw: e.rollback("v", "s1", **kw),
    "clone": lambda e, **kw: e.clone("v", "s1", "c", **kw),
    "delete_volume": lambda e, **kw: e.delete_volume("v", **kw),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_progress_reaches_the_total(engine: Engine, op: str) -> None:
    seen: list[tuple[int, int]] = []
    OPS[op](engine, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    if op != "clone":
        assert seen[-1][1] >= 1024  # in map records: one per block written
    assert engine.check().ok


@pytest.mark.parametrize("op", sorted(OPS))
def test_cancel_changes_nothing(engine: Engine, op: str) -> None:
    before = state(engine)
    with pytest.raises(errors.Cancelled):
        OPS[op](engine, cancel=lambda: True)
    assert state(engine) == before
    assert engine.check().ok
    OPS[op](engine)  # and it still works afterwards
    assert engine.check().ok
