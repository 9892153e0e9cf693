"""`snapdisk attach` and `detach`: an export as a block device (snapdisk.attach does the work)."""

from __future__ import annotations

import argparse
from typing import Any

from .context import Context, Result
from .parsing import add_command


def cmd_attach(a: argparse.Namespace, ctx: Context) -> Result:
    from .. import attach
    from ..exportspec import ExportSpec
    spec = ExportSpec.parse(a.export)
    vol, snap = spec.volume, spec.snapshot
    if snap is None:  # a clear "no such volume" before any process is started
        ctx.call("volume.info", name=vol)
    else:
        ctx.call("snapshot.info", volume=vol, snapshot=snap)
    ctx.close()
    dev = attach.attach(ctx.store, a.export, method=a.method, readonly=a.read_only)
    return {"export": a.export, "device": dev}, dev


def cmd_detach(a: argparse.Namespace, ctx: Context) -> Result:
    from .. import attach
    rec = attach.detach(ctx.store, a.target)
    return rec, f"detached {rec['export']} ({rec['device']})"

def register(sub: Any) -> None:
    """`attach` and `detach`."""
    p = add_command(sub, "attach", cmd_attach, "attach a volume or snapshot as a block device", """
        Prints the block device: /dev/nbdN through the kernel's nbd driver (nbd-client) when
        the kernel has one, else a loop device over nbdfuse (FUSE).  A snapshot
        (VOLUME@SNAPSHOT) is attached read-only.  Needs root and a running server.  What was
        made is recorded in STORE/attach/ so that `detach` undoes exactly that.""", """
        snapdisk attach web                 # /dev/nbd0 or /dev/loop0
        mkfs.ext4 $(snapdisk attach web)
        snapdisk attach web@before-upgrade  # read-only""")
    p.add_argument("export", metavar="VOLUME[@SNAPSHOT]")
    p.add_argument("--method", choices=["auto", "nbd", "loop"], default="auto",
                   help="nbd: the kernel's nbd driver; loop: nbdfuse + loop device; auto: nbd "
                        "when the kernel has it (default)")
    p.add_argument("--read-only", action="store_true", help="attach read-only")

    p = add_command(sub, "detach", cmd_detach, "detach a device made by attach", """
        TARGET is the device attach printed, or the export name.  A mounted device is
        refused (exit code 7): unmount it first.""", """
        snapdisk detach /dev/loop0
        snapdisk detach web""")
    p.add_argument("target", metavar="DEVICE|VOLUME[@SNAPSHOT]")
