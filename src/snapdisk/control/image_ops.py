"""The image.* control ops (issue 13): `image.export` and `image.import`, jobs with progress,
registered in ops.OPS.  Server only: they run qemu-img against the server's own NBD socket
(imagecopy.py); offline the CLI starts a temporary server for them (cli/image_cmds.py).

    image.export  volume, snapshot, file (absolute), format raw|qcow2, overwrite
    image.import  file (absolute), name, format (raw|qcow2, default: detected),
                  encrypt, passphrase | key_hex (a new encrypted volume; never kept by the job)
"""

from __future__ import annotations

from typing import Any

from .. import errors, keys
from ..engine import Engine
from .jobs import call_with_progress
from .ops import Context, _op, opt, req


def _nbd_socket(ctx: Context) -> str:
    status = ctx.status() if ctx.status is not None else {}
    sock = status.get("nbd_socket")
    if not sock:
        raise errors.NotRunning("image export/import need a running server's NBD socket")
    return str(sock)


@_op("image.export", server_only=True, engine_call="export_image", volume=req(str),
     snapshot=req(str, int), file=req(str), format=opt(str, default="raw"),
     overwrite=opt(bool, default=False))
def image_export(engine: Engine, ctx: Context, volume: str, snapshot: str | int, file: str,
                 format: str, overwrite: bool) -> Any:
    return call_with_progress(engine.export_image, volume, snapshot, file, format,
                              _nbd_socket(ctx), overwrite=overwrite, progress=ctx.progress)


@_op("image.import", server_only=True, engine_call="import_image", file=req(str),
     name=req(str), format=opt(str), encrypt=opt(bool, default=False), passphrase=opt(str),
     key_hex=opt(str))
def image_import(engine: Engine, ctx: Context, file: str, name: str, format: str | None,
                 encrypt: bool, passphrase: str | None, key_hex: str | None) -> Any:
    secret = None
    if encrypt:
        secret = keys.Secret.from_args({"passphrase": passphrase, "key_hex": key_hex})
    elif passphrase is not None or key_hex is not None:
        raise errors.InvalidArgument("image.import: a passphrase or key without encrypt")
    info = call_with_progress(engine.import_image, file, name, format, _nbd_socket(ctx),
                              encrypt=secret, progress=ctx.progress)
    return {**info, "connections": 0}
