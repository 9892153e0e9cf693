"""`snapdisk send VOL@SNAP [--from VOL@BASE] [-o FILE]` and `snapdisk receive VOL [-i FILE]`.

The stream is never copied through this process: its descriptor (stdout / stdin, or the file
opened here) is handed to the op with SCM_RIGHTS over a unix socket this command listens on
in a private directory (control/stream_ops.py), and the op, in the server or in this process's
local backend, reads or writes it.  Progress shows on stderr when it is a terminal; --json
prints the summary (send: only with -o, stdout being the stream otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from .. import errors
from .context import Context, Result
from .parsing import add_command, split_ref
from .render import format_size

ACCEPT_TIMEOUT = 60.0


@contextlib.contextmanager
def offer_fd(fd: int, store: str) -> Iterator[str]:
    """Listen on a fresh unix socket and hand fd to the first peer of an allowed user (this
    one, root, or the store's owner); yields the socket's path."""
    d = tempfile.mkdtemp(prefix="snapdisk-stream-")
    path = os.path.join(d, "fd.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(ACCEPT_TIMEOUT)
    owner = os.stat(store).st_uid
    if os.getuid() == 0 and owner != 0:  # a root client, a server running as the store's owner
        for p in (d, path):
            os.chown(p, owner, -1)
    allowed = {0, os.getuid(), owner}

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    _, uid, _ = struct.unpack("3i", conn.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                    if uid in allowed:
                        socket.send_fds(conn, [b"F"], [fd])
                        return

    thread = threading.Thread(target=serve, name="snapdisk-fd-offer", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


def _describe(r: dict[str, Any], verb: str) -> str:
    snap = r["snapshot"]["name"]
    kind = f"incremental from @{r['base']['name']}" if r.get("incremental") else "full"
    return (f"{verb} {r['volume']}@{snap} ({kind}): {format_size(r['data_bytes'])} of data, "
            f"{format_size(r['stream_bytes'])} stream, {r['seconds']:.1f} s")


def cmd_send(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    base = None
    if a.base is not None:
        bvol, base = split_ref(a.base)
        if bvol != vol:
            raise errors.InvalidArgument(f"--from {a.base}: the base is a snapshot of {vol} "
                                         "(an older one)")
    if a.output is None:
        if a.json:
            raise errors.InvalidArgument("--json prints a summary on stdout, which is the "
                                         "stream: give the stream a file with -o FILE")
        if sys.stdout.isatty():
            raise errors.InvalidArgument("refusing to write a binary stream to a terminal: "
                                         "redirect stdout, pipe it, or give -o FILE")
        sys.stdout.flush()
        r = _send(ctx, a, vol, snap, base, sys.stdout.fileno())
        return r, ""  # stdout is the stream: nothing else may go there
    try:
        f = open(a.output, "wb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise errors.InvalidArgument(f"cannot create {a.output}: {e.strerror}") from None
    try:
        with f:
            r = _send(ctx, a, vol, snap, base, f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):  # no half stream file left behind
            os.unlink(a.output)
        raise
    return r, _describe(r, "sent") + f" to {a.output}"


def _send(ctx: Context, a: argparse.Namespace, vol: str, snap: str | None, base: str | None,
          fd: int) -> Any:
    with offer_fd(fd, ctx.store) as path:
        return ctx.run_job(f"send {a.ref}", "send", volume=vol, snapshot=snap, base=base,
                           fd_socket=path)


def cmd_receive(a: argparse.Namespace, ctx: Context) -> Result:
    if a.input is None:
        if sys.stdin.isatty():
            raise errors.InvalidArgument("receive reads the stream from stdin: pipe it in, or "
                                         "give -i FILE")
        r = _receive(ctx, a, sys.stdin.fileno())
    else:
        try:
            f = open(a.input, "rb")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot open {a.input}: {e.strerror}") from None
        with f:
            r = _receive(ctx, a, f.fileno())
    return r, _describe(r, "received")


def _receive(ctx: Context, a: argparse.Namespace, fd: int) -> Any:
    with offer_fd(fd, ctx.store) as path:
        return ctx.run_job(f"receive {a.volume}", "receive", volume=a.volume, fd_socket=path,
                           force=a.force)


def register(sub: Any) -> None:
    p = add_command(sub, "send", cmd_send, "write a snapshot as a stream", """
        Writes the snapshot as a self-describing, checksummed stream (docs/send-receive.md),
        to stdout or to -o FILE: whole, or with --from only the blocks changed since an older
        snapshot of the same volume (read from the map, never by comparing data).
        `snapdisk receive` applies it on another store.  Encrypted volumes are refused: their
        ciphertext is bound to this store's pool (copy with --decrypt first).""", """
        snapdisk send web@monday | snapdisk --store /mnt/backup receive web
        snapdisk send web@tuesday --from web@monday | ssh dr snapdisk receive web
        snapdisk send web@monday -o web-monday.sdstream""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("--from", dest="base", metavar="VOLUME@BASE",
                   help="send only what changed since this older snapshot (incremental)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the stream to FILE")
    p = add_command(sub, "receive", cmd_receive, "apply a stream from `snapdisk send`", """
        Reads a stream from stdin or -i FILE.  A full stream makes a new VOLUME; an
        incremental one applies onto VOLUME, whose newest snapshot must be the stream's base
        (anything else is refused, naming both snapshots).  Either way the snapshot is
        created with the sender's name.  Atomic: a cut, corrupted or cancelled stream, or a
        crash, leaves nothing behind (docs/send-receive.md).  A VOLUME written after its
        newest snapshot is refused, unless --force, which rolls it back to that snapshot
        first (and cuts off its NBD clients).""", """
        snapdisk send web@monday | snapdisk --store /mnt/backup receive web
        snapdisk --store /mnt/backup receive web -i web-tuesday.sdstream --json""")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("-i", "--input", metavar="FILE", help="read the stream from FILE")
    p.add_argument("--force", action="store_true",
                   help="roll VOLUME back to its newest snapshot first if it was written since")
