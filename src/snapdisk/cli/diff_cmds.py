"""`snapdisk diff`: the changed extents between two snapshots of a volume, a snapshot and the
live volume, or a clone's snapshot and its origin's (diff.py; one control op, `diff`)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import errors
from .context import Context, Result
from .parsing import add_command, split_ref
from .render import format_size, table


def show_diff(r: dict[str, Any]) -> str:
    ext = r["extents"]
    head = (f"{len(ext)} changed extent(s), {format_size(r['changed_bytes'])} "
            f"({r['changed_bytes']} bytes)")
    if not ext:
        return head
    return table(["OFFSET", "LENGTH", "SIZE"],
                 [[e["offset"], e["length"], format_size(e["length"])] for e in ext],
                 right="012") + "\n" + head


def cmd_diff(a: argparse.Namespace, ctx: Context) -> Result:
    base_vol, base = split_ref(a.base)
    vol, target = split_ref(a.target, need_snapshot=False)
    if base is None:
        raise errors.InvalidArgument("the first argument is a snapshot: VOLUME@SNAPSHOT")
    r = ctx.call("diff", volume=vol, base=base, target=target,
                 base_volume=None if base_vol == vol else base_vol)
    return r, show_diff(r)


def register(sub: Any) -> None:
    p = add_command(sub, "diff", cmd_diff, "list the blocks that changed between two snapshots",
                    """
        The extents (byte offset, length; 4 KiB aligned) whose content may differ between
        snapshot BASE and TARGET: a later snapshot of the same volume, or the volume itself
        (its live content, without @).  Computed from the extent map's birth and death
        epochs, never by reading data: the work follows the records that changed, not the
        volume's size.  It lists every block that differs and at most the blocks written
        (a block rewritten with the same bytes is listed).

        BASE may also be a snapshot of another volume, e.g. a clone's origin snapshot: then
        the two snapshots' maps are compared block by block (work follows the blocks mapped,
        not only the changed ones).

        To fetch just those blocks, read the extents over NBD (the TARGET's export,
        VOLUME@SNAPSHOT) with nbdcopy, qemu-img or libnbd: see docs/cli.md.""", """
        snapdisk diff web@monday web@tuesday
        snapdisk diff web@monday web                 # since monday, live
        snapdisk diff web@base web-test@today         # a clone against its origin
        snapdisk diff web@monday web@tuesday --json | jq '.extents[]'""")
    p.add_argument("base", metavar="BASE", help="VOLUME@SNAPSHOT")
    p.add_argument("target", metavar="TARGET", help="VOLUME@SNAPSHOT, or VOLUME for its live content")
