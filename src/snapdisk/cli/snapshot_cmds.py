"""`snapdisk snapshot create|list|info|delete`, `rollback` and `clone`: the commands that take
or use a snapshot, and how their results show."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import errors
from .context import Context, Result
from .parsing import add_command, add_group, split_ref
from .render import fields, format_size, format_time, table


def show_snapshot(s: dict[str, Any]) -> str:
    return fields([
        ("snapshot", f"{s['volume']}@{s['name']}"), ("id", s["id"]),
        ("created", format_time(s.get("created"))), ("kind", s.get("kind")),
        ("policy", s.get("policy")), ("size", format_size(s.get("size_bytes"))),
        ("referenced", format_size(s.get("referenced_bytes"))),
        ("exclusive", format_size(s.get("exclusive_bytes")))])


def show_snapshots(snaps: list[dict[str, Any]], volume: str) -> str:
    if not snaps:
        return f"volume {volume} has no snapshots"
    return table(["ID", "NAME", "CREATED", "KIND", "SIZE", "REFERENCED", "EXCLUSIVE"],
                 [[s["id"], s["name"], format_time(s.get("created")), s.get("kind"),
                   format_size(s.get("size_bytes")), format_size(s.get("referenced_bytes")),
                   format_size(s.get("exclusive_bytes"))] for s in snaps], right="0456")


def cmd_snapshot_create(a: argparse.Namespace, ctx: Context) -> Result:
    args: dict[str, Any] = {"volume": a.volume}
    if a.name is not None:
        args["name"] = a.name
    if a.freeze is None:
        s = ctx.call("snapshot.create", **args)
        return s, f"created snapshot {s['volume']}@{s['name']} (id {s['id']})"
    from .. import fsfreeze
    mountpoint = os.path.abspath(a.freeze)
    # What must stay writable while frozen: the store, and this Python (it may write .pyc):
    # the snapdisk package, one directory up from this cli/ package.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fsfreeze.check_freezable(mountpoint, [ctx.store, sys.prefix, here])
    backend = ctx.backend()  # connect (or open the store) before the filesystem is frozen
    s = fsfreeze.run_frozen(mountpoint, lambda: backend.call("snapshot.create", **args),
                            a.freeze_timeout)
    return s, (f"created snapshot {s['volume']}@{s['name']} (id {s['id']}) "
               f"with {mountpoint} frozen")


def cmd_snapshot_list(a: argparse.Namespace, ctx: Context) -> Result:
    snaps = ctx.call("snapshot.list", volume=a.volume)
    return snaps, show_snapshots(snaps, a.volume)


def cmd_snapshot_info(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    s = ctx.call("snapshot.info", volume=vol, snapshot=snap)
    return s, show_snapshot(s)


def cmd_snapshot_delete(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    ctx.run_job(f"delete snapshot {a.ref}", "snapshot.delete", volume=vol, snapshot=snap)
    return {"deleted": a.ref}, f"deleted snapshot {a.ref}"


def cmd_rollback(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    args: dict[str, Any] = {"volume": vol, "snapshot": snap}
    if a.force:
        args["force"] = True
    r = ctx.run_job(f"roll back {vol} to {snap}", "rollback", **args)
    n = r.get("disconnected", 0)
    return r, (f"rolled volume {vol} back to snapshot {snap}"
               + (f" ({n} client connection(s) disconnected)" if n else ""))


def cmd_clone(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    if (a.passphrase_file or a.key_file) and not a.new_key:
        raise errors.InvalidArgument("--passphrase-file and --key-file go with --new-key")
    if a.new_key:  # encrypted volumes: a copy under a new key (key_cmds.py)
        from . import key_cmds
        return key_cmds.cmd_clone_new_key(a, ctx)
    v = ctx.run_job(f"clone {a.ref} as {a.new}", "clone", volume=vol, snapshot=snap, name=a.new)
    return v, f"created volume {v['name']} ({format_size(v['size_bytes'])}) from {a.ref}"


def register(sub: Any) -> None:
    """The `snapshot` command group, then `rollback` and `clone`."""
    ssub = add_group(sub, "snapshot", "create, list, describe and delete snapshots")
    p = add_command(ssub, "create", cmd_snapshot_create, "take a snapshot of a volume", """
        Instant whatever the volume's size: the snapshot holds every write acknowledged
        before it and none after.  Without --name it is called snap-ID.  With
        --freeze MOUNTPOINT the filesystem mounted there (on the attached volume) is frozen
        (FIFREEZE) around the snapshot so that it is clean, and always thawed (FITHAW), even
        on error or Ctrl-C.  Past the manual snapshot quota it is refused (exit code 5).""",
        """
        snapdisk snapshot create web --name before-upgrade
        snapdisk snapshot create web --freeze /mnt/web""")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--name", metavar="NAME", help="the snapshot's name (default: snap-ID)")
    p.add_argument("--freeze", metavar="MOUNTPOINT",
                   help="freeze the filesystem mounted there while the snapshot is taken")
    p.add_argument("--freeze-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="thaw anyway after this long (default: 60)")
    p = add_command(ssub, "list", cmd_snapshot_list, "list a volume's snapshots", """
        Oldest first, with each snapshot's referenced bytes (the data it sees) and exclusive
        bytes (what deleting it would free).""", """
        snapdisk snapshot list web""")
    p.add_argument("volume", metavar="VOLUME")
    p = add_command(ssub, "info", cmd_snapshot_info, "describe a snapshot", """
        SNAPSHOT is a name or an id.""", """
        snapdisk snapshot info web@before-upgrade
        snapdisk snapshot info web@3 --json""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p = add_command(ssub, "delete", cmd_snapshot_delete, "delete a snapshot", """
        Frees the blocks only it holds.  Later snapshots and clones made from it keep their
        data.""", """
        snapdisk snapshot delete web@before-upgrade""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    from . import key_cmds
    key_cmds.register_snapshot_copy(ssub)  # encrypted volumes (issue 11)

    p = add_command(sub, "rollback", cmd_rollback, "make a volume's content a snapshot's again", """
        Every snapshot, earlier and later, stays.  The cost grows with what changed since the
        snapshot, not with the volume's size.  Unmount the volume's filesystem first.  A
        volume with connected clients (attached, or any NBD client) is refused (exit code 7)
        unless --force, which disconnects them first so that none keeps stale cached
        blocks.""", """
        snapdisk rollback web@before-upgrade
        snapdisk rollback web@before-upgrade --force""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("--force", action="store_true", help="disconnect connected clients first")

    p = add_command(sub, "clone", cmd_clone, "create a volume from a snapshot", """
        Instant: the new volume shares the snapshot's blocks and only its own writes take
        space.  The snapshot can later be deleted; the clone keeps its data.""", """
        snapdisk clone web@before-upgrade web-test
        snapdisk clone web@s1 web-other --new-key --passphrase-file pw.txt""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("new", metavar="NEWVOLUME")
    from . import key_cmds
    key_cmds.add_clone_new_key_args(p)
