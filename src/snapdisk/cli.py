"""The `snapdisk` command line: a thin front end.

Every volume and snapshot command is one backend call (`snapdisk.control.backend`): through
the server's control socket when a server runs, on the store directly when none does.  This
module only parses arguments, renders results (human tables, or `--json`), and turns errors
into one line on stderr and the exit code their class declares (errors.py).  `init` creates a
store, `serve`/`stop`/`status` drive snapdisk.daemon, `attach`/`detach` snapdisk.attach.

Long operations (rollback, snapshot delete, volume delete, clone) run as jobs, in the server or
in this process: their progress shows as a bar on a terminal (tqdm, on stderr), as JSON event
lines on stderr with --json (stdout keeps the one result document), and Ctrl-C cancels the job
and waits for it to end (exit 130).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import errors

DEFAULT_STORE = "/var/lib/snapdisk"
UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)
EXIT_INTERRUPTED = 130


# ---- sizes and names --------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes from '4096', '512M', '10G', '1.5TiB' (units are binary: 1K = 1024; an optional
    'B' or 'iB' after the letter is accepted).  The result must be a whole number of bytes."""
    m = SIZE_RE.match(text)
    if not m:
        raise errors.InvalidSize(f"invalid size {text!r}: a number with an optional unit "
                                 "K, M, G, T, P or E (binary: 1K = 1024), e.g. 10G")
    number, unit = m.group(1), m.group(2).upper()
    scale = 1 << (10 * ("KMGTPE".index(unit) + 1)) if unit else 1
    whole, _, frac = number.partition(".")
    numerator = int(whole + frac) * scale
    denominator = 10 ** len(frac)
    if numerator % denominator:
        raise errors.InvalidSize(f"invalid size {text!r}: not a whole number of bytes")
    return numerator // denominator


def format_size(n: int | None) -> str:
    """'512 B', '4 KiB', '1.5 GiB': binary units, at most one decimal."""
    if n is None:
        return "-"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(UNITS) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.1f}".removesuffix(".0") if unit else str(n)
    return f"{text} {UNITS[unit]}"


def split_ref(text: str, need_snapshot: bool = True) -> tuple[str, str | None]:
    """'VOL@SNAP' -> ('VOL', 'SNAP'), checked by snapdisk.exportspec (names, ids in range)."""
    from .exportspec import ExportSpec
    spec = ExportSpec.parse(text, snapshot=True if need_snapshot else None)
    return spec.volume, spec.snapshot


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except errors.InvalidSize as e:
        raise argparse.ArgumentTypeError(e.message) from None


# ---- rendering --------------------------------------------------------------------------------

def format_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: str = "") -> str:
    """A plain aligned table; columns whose index is in `right` (as digits) align right."""
    cells = [list(headers)] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if str(i) in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {'-' if v is None else v}" for k, v in pairs)


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
        ("quotas", f"{v.get('manual_quota')} manual, {v.get('auto_quota')} automatic")]
    pairs += [(k, json.dumps(x) if isinstance(x, dict | list) else x)
              for k, x in sorted((v.get("extra") or {}).items())
              if k not in ("policy", "manual_quota", "auto_quota")]
    return fields(pairs)


def show_volumes(vols: list[dict[str, Any]]) -> str:
    if not vols:
        return "no volumes (create one: snapdisk volume create NAME SIZE)"
    return table(["NAME", "SIZE", "WRITTEN", "SNAPSHOTS", "CREATED", "ORIGIN"],
                 [[v["name"], format_size(v["size_bytes"]), format_size(v.get("live_bytes")),
                   v.get("snapshots", 0), format_time(v.get("created")), _origin(v)]
                  for v in vols], right="123")


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


def show_usage(u: dict[str, Any]) -> str:
    out = []
    for v in u.get("volumes", []):
        snaps = v.get("snapshots") or []
        out.append(f"volume {v['volume']}: size {format_size(v['size_bytes'])}, written "
                   f"{format_size(v['live_bytes'])}, snapshots {format_size(v['snapshots_bytes'])}"
                   f" ({len(snaps)})")
        if "manual_quota" in v:
            out.append(f"  manual {v['snapshots_manual']}/{v['manual_quota']}, automatic "
                       f"{v['snapshots_auto']}/{v['auto_quota']}, policy {v['policy'] or '-'}")
        if snaps:
            out.append(textwrap.indent(table(
                ["ID", "SNAPSHOT", "CREATED", "KIND", "REFERENCED", "EXCLUSIVE"],
                [[s["id"], s["name"], format_time(s.get("created")), s.get("kind"),
                  format_size(s.get("referenced_bytes")), format_size(s.get("exclusive_bytes"))]
                 for s in snaps], right="045"), "  "))
        out.append("")
    st = u.get("store") or {}
    if st:
        out.append(table(
            ["STORE", "POOL", "USED", "FREE", "PENDING", "LOGICAL", "SNAPSHOTS", "ON DISK"],
            [["", format_size(st.get("pool_bytes")), format_size(st.get("used_bytes")),
              format_size(st.get("free_bytes")), format_size(st.get("pending_bytes")),
              format_size(st.get("logical_bytes")), format_size(st.get("snapshots_bytes")),
              format_size(st.get("pool_file_bytes"))]], right="1234567"))
    return "\n".join(out).rstrip()


def show_check(r: dict[str, Any]) -> str:
    if r.get("ok"):
        stats = ", ".join(f"{k} {v}" for k, v in sorted((r.get("stats") or {}).items()))
        return "store is consistent" + (f" ({stats})" if stats else "")
    problems = r.get("problems") or []
    return "\n".join([f"store check found {len(problems)} problem(s):"] + [f"  {p}" for p in problems])


# ---- commands ---------------------------------------------------------------------------------
# Each takes (args, ctx) and returns (result for --json, text for humans); ctx.backend() opens
# the backend on first use.

class ProgressView:
    """A job's events as the user sees them: mode "bar" (a tqdm bar on stderr, for a
    terminal), "json" (each event as one JSON line on stderr) or "none"."""

    def __init__(self, mode: str, desc: str, file: Any = None):
        self.mode = mode
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.bar: Any = None

    def event(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            print(json.dumps(event), file=self.file, flush=True)
        elif self.mode == "bar" and event.get("event") == "job.progress":
            total = event.get("total") or None  # 0: not known yet
            if self.bar is None:
                try:
                    from tqdm import tqdm
                except ImportError:  # a source checkout without its dependencies: no bar
                    self.mode = "none"
                    return
                self.bar = tqdm(total=total, desc=self.desc, file=self.file, leave=False,
                                dynamic_ncols=True)
            self.bar.total = total
            self.bar.n = event.get("done", 0)
            self.bar.refresh()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} ({text})")
        elif self.mode == "bar":
            print(f"snapdisk: {text}", file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_mode(json_output: bool, stream: Any = None) -> str:
    stream = stream if stream is not None else sys.stderr
    if json_output:
        return "json"
    try:
        return "bar" if stream.isatty() else "none"
    except (AttributeError, ValueError):
        return "none"


class Context:
    def __init__(self, store: str, progress: str = "none"):
        self.store = store
        self.progress = progress  # a ProgressView mode
        self._backend: Any = None

    def backend(self) -> Any:
        if self._backend is None:
            from .control.backend import open_backend
            self._backend = open_backend(self.store)
        return self._backend

    def call(self, op: str, **args: Any) -> Any:
        return self.backend().call(op, **args)

    def run_job(self, desc: str, op: str, **args: Any) -> Any:
        """Run op as a job (in the server, or in this process), showing its progress; its
        result, or its error raised.  Ctrl-C cancels it and waits for its end: Cancelled
        (exit 130), also when it had finished before the cancel could take effect."""
        job = self.backend().start_job(op, **args)
        view = ProgressView(self.progress, desc)
        try:
            try:
                for event in job.events():
                    view.event(event)
            except KeyboardInterrupt:
                view.note("cancelling")
                job.cancel()
                final = job.wait()
                if final.get("ok"):
                    raise errors.Cancelled(f"interrupted, but {desc} had already completed "
                                           "before the cancel could take effect") from None
                code = (final.get("error") or {}).get("code")
                if code == errors.Cancelled.code:
                    raise errors.Cancelled(f"interrupted: {desc} was cancelled") from None
                # It ended with an error of its own: report that one.
        finally:
            view.close()
        return job.outcome()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


Result = tuple[Any, str]


def cmd_init(a: argparse.Namespace, ctx: Context) -> Result:
    from .schedule import local_zone_name, zone
    from .store import StoreConfig
    from .volume import Engine
    config = StoreConfig(pool_bytes=a.pool_size, sync_commits=a.sync_commits,
                         timezone=zone(a.timezone or local_zone_name()).key)
    Engine.create(ctx.store, config).close()
    result = {"store": ctx.store, "pool_bytes": config.pool_bytes,
              "sync_commits": config.sync_commits, "timezone": config.timezone}
    return result, (f"created store {ctx.store} (pool {format_size(config.pool_bytes)}, "
                    f"sync commits {'on' if config.sync_commits else 'off'})")


def cmd_volume_create(a: argparse.Namespace, ctx: Context) -> Result:
    v = ctx.call("volume.create", name=a.name, size_bytes=a.size)
    return v, f"created volume {v['name']} ({format_size(v['size_bytes'])})"


def cmd_volume_list(a: argparse.Namespace, ctx: Context) -> Result:
    vols = ctx.call("volume.list")
    return vols, show_volumes(vols)


def cmd_volume_info(a: argparse.Namespace, ctx: Context) -> Result:
    v = ctx.call("volume.info", name=a.name)
    return v, show_volume(v)


def cmd_volume_resize(a: argparse.Namespace, ctx: Context) -> Result:
    v = ctx.call("volume.resize", name=a.name, size_bytes=a.size)
    return v, f"volume {v['name']} is now {format_size(v['size_bytes'])}"


def cmd_volume_delete(a: argparse.Namespace, ctx: Context) -> Result:
    ctx.run_job(f"delete volume {a.name}", "volume.delete", name=a.name)
    return {"deleted": a.name}, f"deleted volume {a.name}"


def cmd_snapshot_create(a: argparse.Namespace, ctx: Context) -> Result:
    args: dict[str, Any] = {"volume": a.volume}
    if a.name is not None:
        args["name"] = a.name
    if a.freeze is None:
        s = ctx.call("snapshot.create", **args)
        return s, f"created snapshot {s['volume']}@{s['name']} (id {s['id']})"
    from . import fsfreeze
    mountpoint = os.path.abspath(a.freeze)
    # What must stay writable while frozen: the store, and this Python (it may write .pyc).
    here = os.path.dirname(os.path.abspath(__file__))
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
    v = ctx.run_job(f"clone {a.ref} as {a.new}", "clone", volume=vol, snapshot=snap, name=a.new)
    return v, f"created volume {v['name']} ({format_size(v['size_bytes'])}) from {a.ref}"


def cmd_usage(a: argparse.Namespace, ctx: Context) -> Result:
    u = ctx.call("usage", **({"volume": a.volume} if a.volume else {}))
    return u, show_usage(u)


def cmd_check(a: argparse.Namespace, ctx: Context) -> Result:
    r = ctx.call("check")
    if not r.get("ok"):
        raise _CheckFailed(r)
    return r, show_check(r)


class _CheckFailed(Exception):
    def __init__(self, report: dict[str, Any]):
        super().__init__("store check failed")
        self.report = report


def cmd_serve(a: argparse.Namespace, ctx: Context) -> Result:
    from . import daemon
    info = daemon.serve(ctx.store, listen=a.listen, foreground=a.foreground, threads=a.threads,
                        insecure_plaintext_tcp=a.insecure_plaintext_tcp, clock=a.clock)
    lines = [f"serving {ctx.store} (pid {info.pid})",
             f"  volume:   {info.uri('VOLUME')}",
             f"  snapshot: {info.uri('VOLUME@SNAPSHOT')}"]
    if info.tcp:
        lines += [f"  tcp:      {info.tcp_uri('VOLUME')}"
                  + ("" if info.tls_psk_file else "  (plain text: INSECURE, any local user)")]
    lines += [f"  control:  {info.control_socket}"]
    if info.log:
        lines += [f"  log:      {info.log}"]
    return info.to_dict(), "\n".join(lines)


def cmd_stop(a: argparse.Namespace, ctx: Context) -> Result:
    from . import attach, daemon
    attached = [r for r in attach.list_attachments(ctx.store) if r["alive"]]
    if attached and not a.force:
        devices = ", ".join(f"{r['export']} as {r['device']}" for r in attached)
        raise errors.Busy(f"still attached: {devices}; their I/O would fail once the server is "
                          "gone: detach them first (or --force)")
    pid = daemon.stop(ctx.store, timeout=a.timeout)
    return {"stopped": True, "pid": pid, "store": ctx.store}, \
        f"stopped the server of {ctx.store} (pid {pid})"


def show_status(st: dict[str, Any]) -> str:
    if not st.get("running"):
        head = [("server", "not running"), ("store", st.get("store"))]
    else:
        up = st.get("uptime_seconds")
        head = [("server", f"running, pid {st.get('pid')}"
                           + (f", up {up:.0f} s" if isinstance(up, int | float) else "")),
                ("store", st.get("store")), ("nbd", st.get("listen")),
                ("control", st.get("control_socket")), ("log", st.get("log"))]
        if st.get("error"):
            head.append(("error", st["error"]))
    out = [fields(head)]
    exports = st.get("exports") or {}
    if exports:
        out.append(table(["EXPORT", "CONNECTIONS", "REVOKED"],
                         [[e, c.get("connections", 0), c.get("revoked", 0)]
                          for e, c in sorted(exports.items())], right="12"))
    if st.get("attached"):
        out.append(table(["ATTACHED", "DEVICE", "METHOD", "MODE", "STATE"],
                         [[r["export"], r["device"], r["method"], "ro" if r["readonly"] else "rw",
                           "attached" if r["alive"] else "stale (detach clears it)"]
                          for r in st["attached"]]))
    return "\n\n".join(out)


def cmd_status(a: argparse.Namespace, ctx: Context) -> Result:
    from . import attach, daemon
    st = dict(daemon.status(ctx.store))
    st["attached"] = attach.list_attachments(ctx.store)
    return st, show_status(st)


def cmd_attach(a: argparse.Namespace, ctx: Context) -> Result:
    from . import attach
    from .exportspec import ExportSpec
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
    from . import attach
    rec = attach.detach(ctx.store, a.target)
    return rec, f"detached {rec['export']} ({rec['device']})"


# ---- the parser -------------------------------------------------------------------------------

def exit_codes_text() -> str:
    """The exit-code table, built from errors.py (docs/cli.md shows the same table)."""
    by_code: dict[int, list[str]] = {0: ["success"]}
    for cls in errors.ALL.values():
        by_code.setdefault(cls.exit_code, []).append(cls.code)
    by_code.setdefault(2, []).insert(0, "usage")
    by_code.setdefault(EXIT_INTERRUPTED, []).append("interrupted (Ctrl-C)")
    lines = ["exit codes:"]
    lines += [f"  {code:<4} {', '.join(dict.fromkeys(names))}" for code, names in sorted(by_code.items())]
    return "\n".join(lines)


STORE_HELP = (f"the store directory (default: $SNAPDISK_STORE, else {DEFAULT_STORE})")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--store and --json, accepted before or after the command (subcommands SUPPRESS their
    defaults so that they do not overwrite a value given before the command)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--store", metavar="DIR", default=default, help=STORE_HELP)
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="print machine-readable JSON instead of tables")


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace, Context], Result],
             summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, formatter_class=_Formatter,
        description=summary + "\n\n" + textwrap.dedent(description).strip(),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")
        + "\n\n" + exit_codes_text())
    _globals(p, suppress=True)
    p.set_defaults(func=func)
    return p


def _group(sub: Any, name: str, summary: str) -> Any:
    p = sub.add_parser(name, help=summary, description=summary, formatter_class=_Formatter)
    return p.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


MAIN_DESCRIPTION = """\
snapdisk: a userspace block device with instant snapshots, rollback and clones.

A store (one directory) holds volumes (virtual disks).  `snapdisk serve` serves each volume
as an NBD export named after it, and each snapshot read-only as VOLUME@SNAPSHOT:
  nbd+unix:///VOLUME?socket=STORE/nbd.sock
  nbd+unix:///VOLUME@SNAPSHOT?socket=STORE/nbd.sock
`snapdisk attach VOLUME` turns an export into a block device to put a filesystem on.

Commands work through the running server's control socket, or on the store directly when no
server runs (one writer at a time: a second gets exit code 7).  Long operations (rollback,
delete, clone) show their progress on a terminal (JSON lines on stderr with --json); Ctrl-C
cancels them (exit code 130).  Sizes take binary units: 4096, 512M, 10G, 1.5T (1K = 1024).
`snapdisk COMMAND --help` describes each command."""

MAIN_EXAMPLES = """\
examples:
  snapdisk --store /srv/disks init --pool-size 100G
  export SNAPDISK_STORE=/srv/disks
  snapdisk volume create web 10G
  snapdisk serve
  snapdisk attach web                    # prints /dev/nbd0, or /dev/loop0 over nbdfuse
  snapdisk snapshot create web --name before-upgrade
  snapdisk rollback web@before-upgrade --force
  snapdisk clone web@before-upgrade web-test
  snapdisk usage web
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapdisk", formatter_class=_Formatter, description=MAIN_DESCRIPTION,
        epilog=MAIN_EXAMPLES + "\n" + exit_codes_text())
    _globals(parser, suppress=False)
    from importlib.metadata import PackageNotFoundError, version
    try:
        ver = version("snapdisk")
    except PackageNotFoundError:
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"snapdisk {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(sub, "init", cmd_init, "create a new, empty store", """
        Creates the store directory (mode 0700) with its metadata (LMDB) and its sparse data
        pool file.  The pool size is the most data the store will hold, shared by all
        volumes and snapshots; by default it is the free space of the filesystem now.
        An existing store is never overwritten (exit code 4).""", """
        snapdisk --store /srv/disks init --pool-size 100G
        SNAPDISK_STORE=/tmp/s snapdisk init --sync-commits""")
    p.add_argument("--pool-size", type=_size_arg, metavar="SIZE",
                   help="capacity of the data pool (default: the filesystem's free space)")
    p.add_argument("--sync-commits", action="store_true",
                   help="make every metadata commit durable at once (slower); by default "
                        "durability comes with each NBD FLUSH")
    p.add_argument("--timezone", metavar="ZONE", help="IANA time zone of snapshot policy slots "
                   "(default: the system's local zone)")

    vsub = _group(sub, "volume", "create, list, describe, resize and delete volumes")
    p = _command(vsub, "create", cmd_volume_create, "create a volume (a virtual disk)", """
        The volume reads as zeros and takes no space until written.  NAME: 1-64 letters,
        digits, '.', '_' or '-', starting with a letter or digit.  SIZE: a multiple of 512
        bytes.  A running server exports it at once, as NAME.""", """
        snapdisk volume create web 10G
        snapdisk volume create scratch 512M --json""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE", type=_size_arg)
    _command(vsub, "list", cmd_volume_list, "list the volumes", """
        One line per volume: its size, the bytes written to it (live), its snapshot count,
        when it was made and, for a clone, the snapshot it was cloned from.""", """
        snapdisk volume list
        snapdisk volume list --json | jq -r '.[].name'""")
    p = _command(vsub, "info", cmd_volume_info, "describe a volume", """
        Size, bytes written, creation time, origin (for a clone) and snapshot counts.""", """
        snapdisk volume info web""")
    p.add_argument("name", metavar="NAME")
    p = _command(vsub, "resize", cmd_volume_resize, "grow a volume", """
        Volumes grow; shrinking would drop data and is refused (exit code 2).  Clients
        connected before the resize keep seeing the old size until they reconnect.""", """
        snapdisk volume resize web 20G""")
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE", type=_size_arg)
    p = _command(vsub, "delete", cmd_volume_delete, "delete a volume and all its snapshots", """
        Frees every block that nothing else holds (clones keep what they share).  A volume
        that is attached or has connected clients is refused (exit code 7).""", """
        snapdisk volume delete scratch""")
    p.add_argument("name", metavar="NAME")

    from . import cli_policy  # policy, config, volume set
    cli_policy.add_parsers(sub, vsub)

    ssub = _group(sub, "snapshot", "create, list, describe and delete snapshots")
    p = _command(ssub, "create", cmd_snapshot_create, "take a snapshot of a volume", """
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
    p = _command(ssub, "list", cmd_snapshot_list, "list a volume's snapshots", """
        Oldest first, with each snapshot's referenced bytes (the data it sees) and exclusive
        bytes (what deleting it would free).""", """
        snapdisk snapshot list web""")
    p.add_argument("volume", metavar="VOLUME")
    p = _command(ssub, "info", cmd_snapshot_info, "describe a snapshot", """
        SNAPSHOT is a name or an id.""", """
        snapdisk snapshot info web@before-upgrade
        snapdisk snapshot info web@3 --json""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p = _command(ssub, "delete", cmd_snapshot_delete, "delete a snapshot", """
        Frees the blocks only it holds.  Later snapshots and clones made from it keep their
        data.""", """
        snapdisk snapshot delete web@before-upgrade""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")

    p = _command(sub, "rollback", cmd_rollback, "make a volume's content a snapshot's again", """
        Every snapshot, earlier and later, stays.  The cost grows with what changed since the
        snapshot, not with the volume's size.  Unmount the volume's filesystem first.  A
        volume with connected clients (attached, or any NBD client) is refused (exit code 7)
        unless --force, which disconnects them first so that none keeps stale cached
        blocks.""", """
        snapdisk rollback web@before-upgrade
        snapdisk rollback web@before-upgrade --force""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("--force", action="store_true", help="disconnect connected clients first")

    p = _command(sub, "clone", cmd_clone, "create a volume from a snapshot", """
        Instant: the new volume shares the snapshot's blocks and only its own writes take
        space.  The snapshot can later be deleted; the clone keeps its data.""", """
        snapdisk clone web@before-upgrade web-test""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("new", metavar="NEWVOLUME")

    p = _command(sub, "usage", cmd_usage, "show capacity: the snapshot chain and the store", """
        For each volume (or just VOLUME): its size, the bytes written, the bytes its snapshots
        hold, and for each snapshot its referenced bytes (the data it sees) and exclusive
        bytes (what deleting it frees).  Then the store: pool capacity, used, free, pending
        (freed, reusable after the next flush), logical (the volumes' sizes added up), all
        snapshots, and the pool file's size on disk.""", """
        snapdisk usage
        snapdisk usage web --json""")
    p.add_argument("volume", metavar="VOLUME", nargs="?")

    _command(sub, "check", cmd_check, "check the store's integrity", """
        Reads every map against the allocator and every index against its table, repairing
        nothing.  Exits 0 when the store is consistent, 10 when problems were found (each is
        printed).""", """
        snapdisk check
        snapdisk check --json""")

    p = _command(sub, "serve", cmd_serve, "start the NBD and control server", """
        Starts nbdkit with snapdisk's plugin: every volume is an NBD export named after it,
        every snapshot a read-only export VOLUME@SNAPSHOT, on the unix socket STORE/nbd.sock
        (reachable by the store's owner and root); the control socket STORE/control.sock
        takes every other command while volumes stay served.  --listen tcp:127.0.0.1:PORT
        adds TCP on loopback beside the unix socket, where clients must use TLS with the
        pre-shared key in STORE/tls.psk (made owner-only at the first TCP serve; see
        docs/security.md); plain-text TCP, which any local user can reach, only with
        --insecure-plaintext-tcp.  Runs in the background (pid file STORE/server.pid)
        unless --foreground (for systemd).  A second server on one store is refused (exit
        code 7).""", """
        snapdisk serve
        snapdisk serve --listen tcp:127.0.0.1:10809
        nbdinfo 'nbds://snapdisk@127.0.0.1:10809/web?tls-psk-file=/srv/disks/tls.psk'
        snapdisk serve --foreground       # e.g. from contrib/snapdisk.service""")
    p.add_argument("--listen", metavar="tcp:127.0.0.1:PORT",
                   help="also listen on TCP (loopback only; TLS-PSK required)")
    p.add_argument("--insecure-plaintext-tcp", action="store_true",
                   help="serve --listen's TCP without TLS: every local user can then read "
                        "and write every volume")
    p.add_argument("--foreground", action="store_true", help="do not go to the background")
    p.add_argument("--clock", metavar="FILE", help="for tests: the scheduler reads the time "
                   "from FILE (one ISO-8601 line with offset), not the system clock")
    # Gone: nbdkit 1.32's parallel model could abort the server; daemon.serve says so.
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)

    p = _command(sub, "stop", cmd_stop, "stop the server", """
        Flushes, disconnects clients, closes the store and waits for the server to exit.
        While devices made by `snapdisk attach` are attached it refuses (exit code 7): their
        I/O would fail once the server is gone.  Detach them first, or --force.""", """
        snapdisk stop
        snapdisk stop --force --timeout 60""")
    p.add_argument("--force", action="store_true",
                   help="stop even while devices are attached (their I/O will fail)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for a clean exit (default: 30)")

    _command(sub, "status", cmd_status, "show the server's state and what is attached", """
        Whether a server runs for the store (its pid, sockets and connections), and every
        device that `snapdisk attach` made.""", """
        snapdisk status
        snapdisk status --json""")

    p = _command(sub, "attach", cmd_attach, "attach a volume or snapshot as a block device", """
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

    p = _command(sub, "detach", cmd_detach, "detach a device made by attach", """
        TARGET is the device attach printed, or the export name.  A mounted device is
        refused (exit code 7): unmount it first.""", """
        snapdisk detach /dev/loop0
        snapdisk detach web""")
    p.add_argument("target", metavar="DEVICE|VOLUME[@SNAPSHOT]")
    return parser


# ---- main -------------------------------------------------------------------------------------

def resolve_store(given: str | None) -> str:
    """--store, else $SNAPDISK_STORE, else the default.  An empty one is refused, never read
    as "unset": `--store "$DIR" volume delete x` with DIR unset must not reach the default."""
    env = os.environ.get("SNAPDISK_STORE")
    if given == "" or (given is None and env == ""):
        raise errors.InvalidArgument("the store path is empty (--store or SNAPDISK_STORE): "
                                     "name a store directory")
    return os.path.abspath(given or env or DEFAULT_STORE)


def _fail(message: str, code: int) -> NoReturn:
    print(f"snapdisk: error: {message}", file=sys.stderr)
    sys.exit(code)


def _emit(a: argparse.Namespace, result: Any, text: str) -> None:
    if a.json:
        print(json.dumps(result, indent=2, default=str))
    elif text:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        ctx = Context(resolve_store(a.store), progress_mode(a.json))
    except errors.SnapdiskError as e:
        _fail(e.message, e.exit_code)
    try:
        result, text = a.func(a, ctx)
        _emit(a, result, text)
        return 0
    except _CheckFailed as e:
        _emit(a, e.report, show_check(e.report))
        _fail(f"the store has {len(e.report.get('problems') or [])} problem(s)",
              errors.Corrupt.exit_code)
    except errors.SnapdiskError as e:
        _fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `snapdisk ... | head`
        return 0
    except OSError as e:
        if os.environ.get("SNAPDISK_DEBUG"):
            raise
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1)
    finally:
        with contextlib.suppress(errors.SnapdiskError):
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
