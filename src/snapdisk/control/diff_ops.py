"""The diff control op (diff.py): the changed ranges between two snapshots of a volume, or a
snapshot and the live volume, or a clone's snapshot and its origin's."""

from __future__ import annotations

from typing import Any

from ..engine import Engine
from .ops import Context, _op, opt, req


@_op("diff", volume=req(str), base=opt(str, int), target=opt(str, int),
     base_volume=opt(str))
def diff(engine: Engine, ctx: Context, volume: str, base: str | int | None,
         target: str | int | None,
         base_volume: str | None) -> Any:
    changes = engine.diff(volume, base, target, base_volume)
    return {"volume": volume, "base": base, "base_volume": base_volume or volume,
            "target": target, "changed_bytes": sum(c.length for c in changes),
            "extents": [c.to_dict() for c in changes]}
