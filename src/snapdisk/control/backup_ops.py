"""The backup.* control ops (backup.py, backup_restore.py), registered in ops.OPS.

    backup          VOL@SNAP into s3://BUCKET/PREFIX (a job: progress in bytes, cancel)
    backup.list     the backups of a repository
    backup.verify   fetch and check every chunk of one backup (a job)
    backup.prune    delete old backups and the chunks only they named (a job)
    restore         a backup into a new volume of this store (a job)

Credentials: `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token` and `region`
travel in the request (the CLI reads them from boto3's default chain in its own process: never
from its command line); absent, the server's own chain is used.  Like passphrases they are never
logged, never echoed in an error, and replaced by "<secret>" in what a job keeps (SECRET_ARGS).
"""

from __future__ import annotations

from typing import Any

from ..engine import Engine
from . import ops
from .jobs import call_with_progress
from .ops import Context, _op, opt, req

_CREDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
ops.SECRET_ARGS = ops.SECRET_ARGS | frozenset(_CREDS)
_S3: dict[str, Any] = {"url": req(str), "endpoint": opt(str), "region": opt(str),
       **{k: opt(str) for k in _CREDS}}


def _split(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    creds = {k: kw.pop(k) for k in (*_CREDS, "region")}
    return kw, {k: v for k, v in creds.items() if v is not None}


@_op("backup", engine_call="backup", volume=req(str), snapshot=req(str, int),
     resume=opt(bool, default=False), **_S3)
def backup(engine: Engine, ctx: Context, **kw: Any) -> Any:
    kw, creds = _split(kw)
    return call_with_progress(engine.backup, kw["volume"], kw["snapshot"], kw["url"],
                              kw["endpoint"], creds, kw["resume"], progress=ctx.progress)


@_op("backup.list", **_S3)
def backup_list(engine: Engine, ctx: Context, **kw: Any) -> Any:
    from .. import backup as b
    kw, creds = _split(kw)
    return b.list_backups(kw["url"], kw["endpoint"], creds)


@_op("backup.verify", engine_call="backup_verify", volume=req(str), snapshot=req(str), **_S3)
def backup_verify(engine: Engine, ctx: Context, **kw: Any) -> Any:
    kw, creds = _split(kw)
    return call_with_progress(engine.backup_verify, kw["url"], kw["volume"], kw["snapshot"],
                              kw["endpoint"], creds, progress=ctx.progress)


@_op("backup.prune", engine_call="backup_prune", keep_last=opt(int), keep_days=opt(int, float),
     **_S3)
def backup_prune(engine: Engine, ctx: Context, **kw: Any) -> Any:
    kw, creds = _split(kw)
    return call_with_progress(engine.backup_prune, kw["url"], kw["keep_last"], kw["keep_days"],
                              kw["endpoint"], creds, progress=ctx.progress)


@_op("restore", engine_call="restore_backup", volume=req(str), snapshot=req(str), name=req(str),
     **_S3)
def restore(engine: Engine, ctx: Context, **kw: Any) -> Any:
    kw, creds = _split(kw)
    return call_with_progress(engine.restore_backup, kw["url"], kw["volume"], kw["snapshot"],
                              kw["name"], kw["endpoint"], creds, progress=ctx.progress)
