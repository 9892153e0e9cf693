"""`snapdisk export VOL@SNAP FILE` and `snapdisk import FILE VOL` (issue 13; imagecopy.py).

Both are jobs of the server (image.export / image.import: qemu-img convert over its NBD
socket), shown with the usual progress bar (JSON lines with --json) and cancelled by Ctrl-C.
With no server running, a temporary one is started for the command on a private unix socket in
a new temporary directory and stopped (by its pid) afterwards, also on failure or Ctrl-C; while
it runs, the store is served (its control socket answers) as with `snapdisk serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .. import errors
from .context import Context, Result
from .parsing import add_command, split_ref
from .render import format_size


@contextlib.contextmanager
def served(ctx: Context) -> Iterator[Context]:
    """ctx if a server runs for the store; else a Context on a temporary server (stopped by
    pid at the end, whatever happens)."""
    from .. import daemon
    if daemon.running_pid(ctx.store) is not None:
        yield ctx
        return
    tmp = tempfile.mkdtemp(prefix="snapdisk-image-")
    pid: int | None = None
    try:
        info = daemon.serve(ctx.store, listen=f"unix:{os.path.join(tmp, 'nbd.sock')}",
                            timeout=60)
        pid = info.pid
        sub = Context(ctx.store, ctx.progress)
        try:
            yield sub
        finally:
            sub.close()
    finally:
        if pid is not None:
            _stop(ctx.store, pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(store: str, pid: int) -> None:
    from .. import daemon
    with contextlib.suppress(errors.SnapdiskError, OSError):
        daemon.stop(store, timeout=30)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9 if time.monotonic() > deadline - 5 else 15)
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _secret_args(a: argparse.Namespace, confirm: bool) -> dict[str, Any]:
    from . import key_cmds
    return key_cmds.secret(a.passphrase_file, a.key_file, "passphrase", confirm)


def cmd_export(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    path = os.path.abspath(a.file)
    if os.path.lexists(path) and not a.force:  # early, before a server is started
        raise errors.AlreadyExists(f"{path} exists (overwrite it with --force)")
    secret = _secret_args(a, False) if (a.passphrase_file or a.key_file) else None
    with served(ctx) as sctx:
        if secret is not None:
            sctx.call("key.unlock", volume=vol, **secret)
        r = sctx.run_job(f"export {a.ref}", "image.export", volume=vol, snapshot=snap,
                         file=path, format=a.format, overwrite=a.force)
    return r, (f"exported {a.ref} to {path} ({r['format']}, {format_size(r['virtual_size'])}, "
               f"{format_size(r['allocated_bytes'])} allocated) in {r['seconds']:.1f} s")


def cmd_import(a: argparse.Namespace, ctx: Context) -> Result:
    path = os.path.abspath(a.file)
    if not os.path.isfile(path):
        raise errors.NotFound(f"{path}: no such file")
    args: dict[str, Any] = {"file": path, "name": a.volume}
    if a.format:
        args["format"] = a.format
    if a.encrypt:
        args.update(encrypt=True, **_secret_args(a, True))
    elif a.passphrase_file or a.key_file:
        raise errors.InvalidArgument("--passphrase-file and --key-file go with --encrypt")
    with served(ctx) as sctx:
        r = sctx.run_job(f"import {a.file}", "image.import", **args)
    return r, (f"imported {path} ({r['format']}) as volume {r['name']} "
               f"({format_size(r['size_bytes'])}, {format_size(r['live_bytes'])} allocated"
               f"{', encrypted' if r.get('encrypted') else ''}) in {r['seconds']:.1f} s")


def register(sub: Any) -> None:
    from . import key_cmds
    p = add_command(sub, "export", cmd_export, "write a snapshot to a raw or qcow2 image file", """
        Copies the snapshot through its NBD export with `qemu-img convert` (holes stay holes:
        a sparse raw file, unallocated qcow2 clusters), as a job with progress; Ctrl-C cancels
        it.  The image is written beside FILE and renamed over it at the end, so a failed or
        cancelled export leaves no file; an existing FILE is refused without --force.  With no
        server running, a temporary one is started on a private socket for the command.
        An encrypted volume is exported in the clear (the export reads plaintext): it must be
        unlocked (`snapdisk key unlock`), or give its --passphrase-file or --key-file here
        (with a running server the volume then stays unlocked).""", """
        snapdisk export web@before-upgrade web.qcow2 --format qcow2
        snapdisk export web@3 /backup/web.img
        snapdisk export vault@s1 vault.img --passphrase-file pw.txt""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="the image format (default: raw)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    key_cmds.add_secret_args(p)
    p = add_command(sub, "import", cmd_import, "create a volume from a raw or qcow2 image", """
        The new volume gets the image's virtual size (rounded up to 4 KiB) and its data,
        written through the volume's NBD export with `qemu-img convert` as a job with
        progress; zero runs stay holes.  The format is detected (qemu-img info) unless
        --format is given; images with a backing file or an external data file are refused
        (convert them to a standalone image first).  On failure or Ctrl-C the half-made volume
        is deleted.  --encrypt makes the new volume encrypted under a new key (the passphrase
        or key file given, prompted for on a terminal).  With no server running, a temporary
        one is started on a private socket for the command.""", """
        snapdisk import web.qcow2 web-restored
        snapdisk import disk.img db --format raw
        snapdisk import disk.qcow2 vault --encrypt --key-file vault.key""")
    p.add_argument("file", metavar="FILE")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--format", choices=("raw", "qcow2"), default=None,
                   help="the image's format (default: detected by qemu-img info)")
    p.add_argument("--encrypt", action="store_true", help="the new volume is encrypted")
    key_cmds.add_secret_args(p)
