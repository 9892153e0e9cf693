"""The commands of snapshot policies, quotas and store options (issue 12):

    snapdisk policy create NAME --hours 0,6,12,18 --days mon-fri --retain 7d
    snapdisk policy list | info NAME | update NAME [...] | delete NAME
    snapdisk policy apply NAME VOL... | remove VOL...
    snapdisk config get [KEY] | set KEY VALUE

Each one control op (control/ops.py), through the server or on the store.  (`volume set`,
the per-volume quotas, is in volume_cmds.)
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import errors
from ..schedule import DAY_NAMES, format_days
from .context import Context, Result
from .parsing import add_command, add_group
from .render import fields, table

HOURS_HELP = "hours of the day, 0-23: a list (0,6,12,18) or a range (9-17)"
DAYS_HELP = "days: mon-fri, mon,wed,sun, sat-sun or daily (default: daily)"
RETAIN_HELP = "how long automatic snapshots are kept: 1-65536 days (7d), or forever"


# ---- rendering ----------------------------------------------------------------------------

def _days(p: dict[str, Any]) -> str:
    return format_days(DAY_NAMES.index(d) for d in p["days"])


def show_policy(p: dict[str, Any]) -> str:
    return fields([
        ("policy", p["name"]), ("hours", ",".join(str(h) for h in p["hours"])),
        ("days", _days(p)), ("retain", p.get("retain")),
        ("time zone", p.get("timezone")), ("next slot", p.get("next_slot")),
        ("volumes", f"{p.get('volume_count', 0)}"
                    + (f" ({', '.join(p['volumes'])})" if p.get("volumes") else ""))])


def show_policies(ps: list[dict[str, Any]]) -> str:
    if not ps:
        return ("no policies (create one: snapdisk policy create NAME --hours 0,12 "
                "--days daily --retain 7d)")
    return table(["NAME", "HOURS", "DAYS", "RETAIN", "VOLUMES", "NEXT SLOT"],
                 [[p["name"], ",".join(str(h) for h in p["hours"]), _days(p),
                   p.get("retain"), p.get("volume_count"), p.get("next_slot")] for p in ps],
                 right="4")


def show_config(c: dict[str, Any]) -> str:
    return fields([(k, v) for k, v in c.items() if k != "timezone_set"])


# ---- commands -----------------------------------------------------------------------------

def _given(a: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}


def cmd_policy_create(a: argparse.Namespace, ctx: Context) -> Result:
    p = ctx.call("policy.create", name=a.name, hours=a.hours, days=a.days, retain=a.retain)
    return p, f"created policy {p['name']} ({p['summary']}; next slot {p['next_slot']})"


def cmd_policy_list(a: argparse.Namespace, ctx: Context) -> Result:
    ps = ctx.call("policy.list")
    return ps, show_policies(ps)


def cmd_policy_info(a: argparse.Namespace, ctx: Context) -> Result:
    p = ctx.call("policy.info", name=a.name)
    return p, show_policy(p)


def cmd_policy_update(a: argparse.Namespace, ctx: Context) -> Result:
    p = ctx.call("policy.update", name=a.name, **_given(a, "hours", "days", "retain"))
    return p, f"updated policy {p['name']} ({p['summary']}; from the next slot, {p['next_slot']})"


def cmd_policy_delete(a: argparse.Namespace, ctx: Context) -> Result:
    r = ctx.call("policy.delete", name=a.name)
    vols = r.get("volumes") or []
    return r, (f"deleted policy {a.name}" + (f" (removed from {', '.join(vols)}; their "
                                             "automatic snapshots stay until they expire)"
                                             if vols else ""))


def cmd_policy_apply(a: argparse.Namespace, ctx: Context) -> Result:
    p = ctx.call("policy.apply", name=a.name, volumes=a.volumes)
    return p, (f"policy {a.name} now covers {', '.join(a.volumes)}; "
               f"next slot {p['next_slot']}")


def cmd_policy_remove(a: argparse.Namespace, ctx: Context) -> Result:
    r = ctx.call("policy.remove", volumes=a.volumes)
    lines = [f"{v}: {'removed policy ' + p if p else 'had no policy'}"
             for v, p in r["removed"].items()]
    return r, "\n".join(lines)


def cmd_config_get(a: argparse.Namespace, ctx: Context) -> Result:
    c = ctx.call("config.get")
    if a.key is not None:
        if a.key not in c:
            raise errors.InvalidArgument(f"unknown option {a.key!r}: one of {', '.join(c)}")
        return {a.key: c[a.key]}, str(c[a.key])
    return c, show_config(c)


def cmd_config_set(a: argparse.Namespace, ctx: Context) -> Result:
    value: str | int = int(a.value) if a.value.isascii() and a.value.isdigit() else a.value
    c = ctx.call("config.set", key=a.key, value=value)
    return c, f"{a.key} = {c[a.key]}"


# ---- parsers ------------------------------------------------------------------------------

def register(sub: Any) -> None:
    """The `policy` and `config` command groups."""
    psub = add_group(sub, "policy", "automatic snapshots: create, list, apply and remove policies")
    p = add_command(psub, "create", cmd_policy_create, "create a snapshot policy", """
        A policy snapshots the volumes it covers (policy apply) at the given hours on the given
        days, in the store's time zone (snapdisk config get timezone), while the server runs,
        and deletes each of those automatic snapshots once it is older than --retain.  They
        are named after their slot: auto-2026-11-25T12:00+08:00.  A slot missed while no
        server ran is not taken late.  Past a volume's auto quota, the oldest automatic
        snapshot is deleted to make room.""", """
        snapdisk policy create hourly --hours 0-23 --retain 2d
        snapdisk policy create office --hours 9,13,17 --days mon-fri --retain 30d""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--hours", required=True, help=HOURS_HELP)
    p.add_argument("--days", default="daily", help=DAYS_HELP)
    p.add_argument("--retain", required=True, help=RETAIN_HELP)
    add_command(psub, "list", cmd_policy_list, "list the policies", """
        Each policy's hours, days, retention, how many volumes it covers and its next slot.""",
             """
        snapdisk policy list --json""")
    p = add_command(psub, "info", cmd_policy_info, "describe a policy", """
        Its schedule, retention, the volumes it covers and its next slot.""", """
        snapdisk policy info office""")
    p.add_argument("name", metavar="NAME")
    p = add_command(psub, "update", cmd_policy_update, "change a policy", """
        Applies to every volume that has the policy, from its next slot.  Automatic
        snapshots already taken keep the retention they were taken with.""", """
        snapdisk policy update office --retain 60d""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--hours", help=HOURS_HELP)
    p.add_argument("--days", help=DAYS_HELP.replace(" (default: daily)", ""))
    p.add_argument("--retain", help=RETAIN_HELP)
    p = add_command(psub, "delete", cmd_policy_delete, "delete a policy", """
        Removes it from its volumes.  The automatic snapshots it made stay, and are still
        deleted when their retention ends.""", """
        snapdisk policy delete office""")
    p.add_argument("name", metavar="NAME")
    p = add_command(psub, "apply", cmd_policy_apply, "give volumes a policy", """
        A volume has at most one policy: this replaces the one it had.  Its first automatic
        snapshot is at the policy's next slot.""", """
        snapdisk policy apply office web db""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("volumes", metavar="VOLUME", nargs="+")
    p = add_command(psub, "remove", cmd_policy_remove, "take volumes off their policy", """
        Their automatic snapshots stay until they expire.""", """
        snapdisk policy remove web""")
    p.add_argument("volumes", metavar="VOLUME", nargs="+")

    csub = add_group(sub, "config", "show and change the store's options")
    p = add_command(csub, "get", cmd_config_get, "show the store's options", """
        timezone (of policy slots), manual-snapshot-quota and auto-snapshot-quota (per
        volume, unless `volume set` gave it its own), and read-only facts.""", """
        snapdisk config get
        snapdisk config get timezone""")
    p.add_argument("key", metavar="KEY", nargs="?")
    p = add_command(csub, "set", cmd_config_set, "change a store option", """
        KEY: timezone (an IANA zone name: Europe/Berlin, America/New_York, UTC),
        manual-snapshot-quota or auto-snapshot-quota (0-1048576 snapshots per volume).""",
                 """
        snapdisk config set timezone Asia/Shanghai
        snapdisk config set manual-snapshot-quota 100""")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")


__all__ = ["register", "show_config", "show_policies", "show_policy"]
