"""`snapdisk volume create|list|info|resize|set|delete`: the commands and how their results
show."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import errors
from . import key_cmds
from .context import Context, Result
from .parsing import add_command, add_group, size_arg
from .render import fields, format_size, format_time, table


def _origin(info: dict[str, Any]) -> str | None:
    o = info.get("origin")
    return f"{o['volume']}@{o['snapshot']}" if o else None


def show_volume(v: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [
        ("name", v["name"]), ("id", v.get("id")),
        ("size", f"{format_size(v['size_bytes'])} ({v['size_bytes']} bytes)"),
        ("written", format_size(v.get("live_bytes"))), ("created", format_time(v.get("created"))),
        ("origin", _origin(v)),
        ("snapshots", f"{v.get('snapshots', 0)} ({v.get('snapshots_manual', 0)} manual, "
                      f"{v.get('snapshots_auto', 0)} automatic)"),
        ("connections", v.get("connections")), ("policy", v.get("policy")),
        ("next slot", v.get("next_slot")),
        ("quotas", f"{v.get('manual_quota')} manual, {v.get('auto_quota')} automatic"),
        ("encrypted", ("yes, locked" if v.get("locked") else "yes")
         if v.get("encrypted") else "no")]
    pairs += [(k, json.dumps(x) if isinstance(x, dict | list) else x)
              for k, x in sorted((v.get("extra") or {}).items())
              if k not in ("policy", "manual_quota", "auto_quota")]
    return fields(pairs)


def show_volumes(vols: list[dict[str, Any]]) -> str:
    if not vols:
        return "no volumes (create one: snapdisk volume create NAME SIZE)"
    return table(["NAME", "SIZE", "WRITTEN", "SNAPSHOTS", "CREATED", "ORIGIN", "ENCRYPTED"],
                 [[v["name"], format_size(v["size_bytes"]), format_size(v.get("live_bytes")),
                   v.get("snapshots", 0), format_time(v.get("created")), _origin(v),
                   ("LOCKED" if v.get("locked") else "yes") if v.get("encrypted") else "-"]
                  for v in vols], right="123")


def cmd_volume_create(a: argparse.Namespace, ctx: Context) -> Result:
    args: dict[str, Any] = {}
    if a.encrypt:
        args = {"encrypt": True, **key_cmds.secret(a.passphrase_file, a.key_file,
                                                   "passphrase", True)}
    elif a.passphrase_file or a.key_file:
        raise errors.InvalidArgument("--passphrase-file and --key-file go with --encrypt")
    v = ctx.call("volume.create", name=a.name, size_bytes=a.size, **args)
    enc = ", encrypted" if v.get("encrypted") else ""
    return v, f"created volume {v['name']} ({format_size(v['size_bytes'])}{enc})"


def cmd_volume_list(a: argparse.Namespace, ctx: Context) -> Result:
    vols = ctx.call("volume.list")
    return vols, show_volumes(vols)


def cmd_volume_info(a: argparse.Namespace, ctx: Context) -> Result:
    v = ctx.call("volume.info", name=a.name)
    return v, show_volume(v)


def cmd_volume_resize(a: argparse.Namespace, ctx: Context) -> Result:
    v = ctx.call("volume.resize", name=a.name, size_bytes=a.size)
    return v, f"volume {v['name']} is now {format_size(v['size_bytes'])}"


def cmd_volume_set(a: argparse.Namespace, ctx: Context) -> Result:
    args = {k: getattr(a, k) for k in ("manual_quota", "auto_quota")
            if getattr(a, k) is not None}
    if not args:
        raise errors.InvalidArgument("volume set: give --manual-quota N and/or --auto-quota N")
    v = ctx.call("volume.set", name=a.name, **args)
    return v, (f"volume {v['name']}: manual quota {v['manual_quota']}, "
               f"auto quota {v['auto_quota']}")


def cmd_volume_delete(a: argparse.Namespace, ctx: Context) -> Result:
    ctx.run_job(f"delete volume {a.name}", "volume.delete", name=a.name)
    return {"deleted": a.name}, f"deleted volume {a.name}"


def register(sub: Any) -> None:
    """The `volume` command group."""
    vsub = add_group(sub, "volume", "create, list, describe, resize and delete volumes")
    p = add_command(vsub, "create", cmd_volume_create, "create a volume (a virtual disk)", """
        The volume reads as zeros and takes no space until written.  NAME: 1-64 letters,
        digits, '.', '_' or '-', starting with a letter or digit.  SIZE: a multiple of 512
        bytes.  A running server exports it at once, as NAME.""", """
        snapdisk volume create web 10G
        snapdisk volume create scratch 512M --json
        snapdisk volume create secret 10G --encrypt --passphrase-file pw.txt""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE", type=size_arg)
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt it (AES-256-XTS) under a new key wrapped by a passphrase or "
                        "key file (prompted for twice on a terminal if neither is given)")
    key_cmds.add_secret_args(p)
    add_command(vsub, "list", cmd_volume_list, "list the volumes", """
        One line per volume: its size, the bytes written to it (live), its snapshot count,
        when it was made and, for a clone, the snapshot it was cloned from.""", """
        snapdisk volume list
        snapdisk volume list --json | jq -r '.[].name'""")
    p = add_command(vsub, "info", cmd_volume_info, "describe a volume", """
        Size, bytes written, creation time, origin (for a clone), snapshot counts, policy and
        next slot, quotas.""", """
        snapdisk volume info web""")
    p.add_argument("name", metavar="NAME")
    p = add_command(vsub, "resize", cmd_volume_resize, "grow a volume", """
        Volumes grow; shrinking would drop data and is refused (exit code 2).  Clients
        connected before the resize keep seeing the old size until they reconnect.""", """
        snapdisk volume resize web 20G""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE", type=size_arg)
    p = add_command(vsub, "set", cmd_volume_set, "set a volume's snapshot quotas", """
        The most manual and automatic snapshots the volume may have (default: the store's,
        snapdisk config get).  A manual snapshot past its quota is refused; an automatic one
        first deletes the oldest automatic snapshot.""", """
        snapdisk volume set web --manual-quota 10 --auto-quota 48""")
    p.add_argument("name", metavar="VOLUME")
    p.add_argument("--manual-quota", type=int, metavar="N")
    p.add_argument("--auto-quota", type=int, metavar="N")
    p = add_command(vsub, "delete", cmd_volume_delete, "delete a volume and all its snapshots", """
        Frees every block that nothing else holds (clones keep what they share).  A volume
        that is attached or has connected clients is refused (exit code 7).""", """
        snapdisk volume delete scratch""")
    p.add_argument("name", metavar="NAME")
