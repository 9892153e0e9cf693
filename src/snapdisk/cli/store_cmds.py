"""The store and its server: `snapdisk init`, `usage`, `check`, `serve`, `stop`, `status`, and
how their results show."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from .. import errors
from .context import Context, Result
from .parsing import add_command, size_arg
from .render import fields, format_size, format_time, table


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
    if st.get("filesystem_free_bytes") is not None:
        out.append(f"filesystem free {format_size(st['filesystem_free_bytes'])}")
    out += [f"warning: {w}" for w in st.get("warnings") or []]
    return "\n".join(out).rstrip()


def show_check(r: dict[str, Any]) -> str:
    if r.get("ok"):
        stats = ", ".join(f"{k} {v}" for k, v in sorted((r.get("stats") or {}).items()))
        return "store is consistent" + (f" ({stats})" if stats else "")
    problems = r.get("problems") or []
    return "\n".join([f"store check found {len(problems)} problem(s):"] + [f"  {p}" for p in problems])


# ---- commands ---------------------------------------------------------------------------------
# Each takes (args, ctx) and returns (result for --json, text for humans); ctx.backend() opens

def show_status(st: dict[str, Any]) -> str:
    if not st.get("running"):
        head = [("server", "not running"), ("store", st.get("store"))]
    else:
        up = st.get("uptime_seconds")
        head = [("server", f"running, pid {st.get('pid')}"
                           + (f", up {up:.0f} s" if isinstance(up, int | float) else "")),
                ("store", st.get("store")), ("nbd", st.get("listen")),
                ("control", st.get("control_socket")), ("log", st.get("log"))]
        space = st.get("space") or {}
        if space:
            head.append(("space", f"pool {format_size(space.get('free_bytes'))} free of "
                                  f"{format_size(space.get('pool_bytes'))}, filesystem "
                                  f"{format_size(space.get('filesystem_free_bytes'))} free"))
        if st.get("error"):
            head.append(("error", st["error"]))
        head += [("warning", w) for w in st.get("warnings") or []]
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


def cmd_init(a: argparse.Namespace, ctx: Context) -> Result:
    from ..engine import Engine
    from ..schedule import local_zone_name, zone
    from ..store import StoreConfig, pool_warnings
    config = StoreConfig(pool_bytes=a.pool_size, unsafe_nosync=a.unsafe_no_sync,
                         timezone=zone(a.timezone or local_zone_name()).key)
    warnings = pool_warnings(ctx.store, a.pool_size) if a.pool_size is not None else []
    Engine.create(ctx.store, config).close()
    result = {"store": ctx.store, "pool_bytes": config.pool_bytes,
              "sync_commits": not config.unsafe_nosync, "timezone": config.timezone,
              "warnings": warnings}
    return result, "\n".join(
        [f"created store {ctx.store} (pool {format_size(config.pool_bytes)}, "
         f"sync commits {'off (UNSAFE)' if config.unsafe_nosync else 'on'})"]
        + [f"warning: {w}" for w in warnings])


def cmd_usage(a: argparse.Namespace, ctx: Context) -> Result:
    from ..capacity import add_space_warnings
    u = ctx.call("usage", **({"volume": a.volume} if a.volume else {}))
    if u.get("store"):
        add_space_warnings(u["store"], ctx.store)
    return u, show_usage(u)


def cmd_check(a: argparse.Namespace, ctx: Context) -> Result:
    r = ctx.call("check")
    if not r.get("ok"):
        raise CheckFailed(r)
    return r, show_check(r)


class CheckFailed(Exception):
    """cmd_check's failed report, for main to print like a result before exiting with
    Corrupt's exit code."""

    def __init__(self, report: dict[str, Any]):
        super().__init__("store check failed")
        self.report = report


def cmd_serve(a: argparse.Namespace, ctx: Context) -> Result:
    from .. import daemon
    from . import key_cmds
    secrets = key_cmds.serve_secrets(a)  # --unlock VOL --passphrase-file F ...
    info = daemon.serve(ctx.store, listen=a.listen, foreground=a.foreground, threads=a.threads,
                        insecure_plaintext_tcp=a.insecure_plaintext_tcp, clock=a.clock)
    unlocked = key_cmds.unlock_served(ctx, secrets)
    lines = [f"serving {ctx.store} (pid {info.pid})",
             f"  volume:   {info.uri('VOLUME')}",
             f"  snapshot: {info.uri('VOLUME@SNAPSHOT')}"]
    if info.tcp:
        lines += [f"  tcp:      {info.tcp_uri('VOLUME')}"
                  + ("" if info.tls_psk_file else "  (plain text: INSECURE, any local user)")]
    lines += [f"  control:  {info.control_socket}"]
    if info.log:
        lines += [f"  log:      {info.log}"]
    lines += [f"  unlocked: {u}" for u in unlocked]
    return {**info.to_dict(), "unlocked": unlocked}, "\n".join(lines)


def cmd_stop(a: argparse.Namespace, ctx: Context) -> Result:
    from .. import attach, daemon
    attached = [r for r in attach.list_attachments(ctx.store) if r["alive"]]
    if attached and not a.force:
        devices = ", ".join(f"{r['export']} as {r['device']}" for r in attached)
        raise errors.Busy(f"still attached: {devices}; their I/O would fail once the server is "
                          "gone: detach them first (or --force)")
    pid = daemon.stop(ctx.store, timeout=a.timeout)
    return {"stopped": True, "pid": pid, "store": ctx.store}, \
        f"stopped the server of {ctx.store} (pid {pid})"


def cmd_status(a: argparse.Namespace, ctx: Context) -> Result:
    from .. import attach, daemon
    st = dict(daemon.status(ctx.store))
    st["attached"] = attach.list_attachments(ctx.store)
    return st, show_status(st)


def register_init(sub: Any) -> None:
    """`init` (first in --help: the first command anyone runs)."""
    p = add_command(sub, "init", cmd_init, "create a new, empty store", """
        Creates the store directory (mode 0700) with its metadata (LMDB) and its sparse data
        pool file.  The pool size is the most data the store will hold, shared by all
        volumes and snapshots; by default 90% of the filesystem's free space now, less a
        reserve for the metadata (1/32 of it, 8 MiB to 4 GiB).  A larger pool is allowed (the
        pool file is sparse), with a warning: writes then fail with ENOSPC once the
        filesystem is full.  An existing store is never overwritten (exit code 4).""", """
        snapdisk --store /srv/disks init --pool-size 100G
        SNAPDISK_STORE=/tmp/s snapdisk init""")
    p.add_argument("--pool-size", type=size_arg, metavar="SIZE",
                   help="capacity of the data pool (default: 90%% of the filesystem's free "
                        "space less a metadata reserve)")
    p.add_argument("--sync-commits", action="store_true",
                   help="accepted for old scripts: metadata commits are always synced now "
                        "(redirected writes are group-committed), unless --unsafe-no-sync")
    p.add_argument("--unsafe-no-sync", action="store_true",
                   help="UNSAFE: do not sync metadata commits (LMDB MDB_NOSYNC) until a FLUSH. "
                        "A power cut or kernel crash may then lose snapshots, clones, "
                        "rollbacks and deletes that already replied, and can damage the "
                        "metadata beyond repair (LMDB's caveat).  A process crash is still "
                        "safe.  For scratch stores only")
    p.add_argument("--timezone", metavar="ZONE", help="IANA time zone of snapshot policy slots "
                   "(default: the system's local zone)")


def register(sub: Any) -> None:
    """`usage`, `check`, `serve`, `stop` and `status`."""
    p = add_command(sub, "usage", cmd_usage, "show capacity: the snapshot chain and the store", """
        For each volume (or just VOLUME): its size, the bytes written, the bytes its snapshots
        hold, and for each snapshot its referenced bytes (the data it sees) and exclusive
        bytes (what deleting it frees).  Then the store: pool capacity, used, free, pending
        (freed, reusable after the next flush), logical (the volumes' sizes added up), all
        snapshots, and the pool file's size on disk; the filesystem's free space and the
        metadata's size; and a warning when the pool has less than 10% free or the
        filesystem less than the pool still offers (writes would fail with ENOSPC).""", """
        snapdisk usage
        snapdisk usage web --json""")
    p.add_argument("volume", metavar="VOLUME", nargs="?")

    add_command(sub, "check", cmd_check, "check the store's integrity", """
        Reads every map against the allocator and every index against its table, repairing
        nothing.  Exits 0 when the store is consistent, 10 when problems were found (each is
        printed).""", """
        snapdisk check
        snapdisk check --json""")

    p = add_command(sub, "serve", cmd_serve, "start the NBD and control server", """
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
        snapdisk serve --foreground       # e.g. from contrib/snapdisk.service
        snapdisk serve --unlock web --passphrase-file /run/secrets/web""")
    p.add_argument("--listen", metavar="tcp:127.0.0.1:PORT",
                   help="also listen on TCP (loopback only; TLS-PSK required)")
    p.add_argument("--insecure-plaintext-tcp", action="store_true",
                   help="serve --listen's TCP without TLS: every local user can then read "
                        "and write every volume")
    p.add_argument("--foreground", action="store_true", help="do not go to the background")
    p.add_argument("--clock", metavar="FILE", help="for tests: the scheduler reads the time "
                   "from FILE (one ISO-8601 line with offset), not the system clock")
    from . import key_cmds
    key_cmds.add_serve_unlock_args(p)
    # Gone: nbdkit 1.32's parallel model could abort the server; daemon.serve says so.
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)

    p = add_command(sub, "stop", cmd_stop, "stop the server", """
        Flushes, disconnects clients, closes the store and waits for the server to exit.
        While devices made by `snapdisk attach` are attached it refuses (exit code 7): their
        I/O would fail once the server is gone.  Detach them first, or --force.""", """
        snapdisk stop
        snapdisk stop --force --timeout 60""")
    p.add_argument("--force", action="store_true",
                   help="stop even while devices are attached (their I/O will fail)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for a clean exit (default: 30)")

    add_command(sub, "status", cmd_status, "show the server's state and what is attached", """
        Whether a server runs for the store (its pid, sockets and connections, the free space
        of the pool and of its filesystem, with usage's warnings), and every device that
        `snapdisk attach` made.""", """
        snapdisk status
        snapdisk status --json""")
