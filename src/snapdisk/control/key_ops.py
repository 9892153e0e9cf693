"""The key.* control ops of encrypted volumes (keys.py, encryption.py), registered in ops.OPS.

Secrets travel in the request only: `passphrase` (a string) or `key_hex` (a key file's 32 bytes
in hex), and for rotation `new_passphrase` / `new_key_hex`.  They are never logged (the server
logs no request arguments), never in a reply (replies carry key ids and KDF parameters only),
and never in an error (keys.py's messages name no secret).  snapshot.copy runs as a job: its
secret arguments are replaced by "<secret>" in what the job keeps (ops.start_job, SECRET_ARGS).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from .. import keys, snapcopy
from ..engine import Engine
from .jobs import call_with_progress
from .ops import Context, _op, _reserve, opt, req


@_op("key.unlock", volume=req(str), passphrase=opt(str), key_hex=opt(str))
def key_unlock(engine: Engine, ctx: Context, volume: str, passphrase: str | None,
               key_hex: str | None) -> Any:
    return engine.unlock(volume, keys.Secret.from_args(
        {"passphrase": passphrase, "key_hex": key_hex}))


@_op("key.lock", volume=req(str), force=opt(bool, default=False))
def key_lock(engine: Engine, ctx: Context, volume: str, force: bool) -> Any:
    """Wipe the key of volume (and of the volumes sharing it) from the server's memory; their
    clients (snapshot exports included) are refused, or disconnected with force, first."""
    revoked = 0
    with ExitStack() as stack:
        for vol in engine.keys.key_vols(volume):
            revoked += stack.enter_context(
                _reserve(ctx, vol, f"lock the key of volume {volume!r}", force=force))
        info = engine.lock(volume)
    return {**info, "disconnected": revoked}


@_op("key.rotate", volume=req(str), passphrase=opt(str), key_hex=opt(str),
     new_passphrase=opt(str), new_key_hex=opt(str))
def key_rotate(engine: Engine, ctx: Context, volume: str, passphrase: str | None,
               key_hex: str | None, new_passphrase: str | None, new_key_hex: str | None) -> Any:
    old = keys.Secret.from_args({"passphrase": passphrase, "key_hex": key_hex})
    new = keys.Secret.from_args({"passphrase": new_passphrase, "key_hex": new_key_hex})
    return engine.rotate_key(volume, old, new)


@_op("key.info", volume=req(str))
def key_info(engine: Engine, ctx: Context, volume: str) -> Any:
    return engine.key_info(volume)


@_op("snapshot.copy", engine_call="copy_snapshot", volume=req(str), snapshot=req(str, int),
     name=req(str), encrypt=opt(bool, default=False), decrypt=opt(bool, default=False),
     passphrase=opt(str), key_hex=opt(str), resume=opt(bool, default=False))
def snapshot_copy(engine: Engine, ctx: Context, volume: str, snapshot: str | int, name: str,
                  encrypt: bool, decrypt: bool, passphrase: str | None, key_hex: str | None,
                  resume: bool) -> Any:
    """A snapshot's data into a new volume, changing its encryption (a job: progress, cancel)."""
    mode, secret = snapcopy.copy_args({"encrypt": encrypt, "decrypt": decrypt,
                                       "passphrase": passphrase, "key_hex": key_hex})
    info = call_with_progress(engine.copy_snapshot, volume, snapshot, name, mode, secret,
                              resume=resume, progress=ctx.progress)
    return {**info.to_dict(), "connections": 0}
