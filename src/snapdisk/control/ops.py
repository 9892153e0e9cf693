"""The operations of the control protocol: one table, used by the server (over the socket, in
the nbdkit process) and by the local backend (the CLI on the store, no server running).

`dispatch(engine, op, args, ctx)` validates `args` against the op's declared arguments (names,
JSON types, required or optional), runs it on the Engine and returns a JSON-able result.
Errors are snapdisk errors; the caller turns them into replies (server) or lets them rise
(local backend).  `ctx` is what only a server has: its NBD connections (so that rollback and
delete can refuse, or revoke, what clients hold), its status and a way to stop it.

An op declared with `engine_call=` (the Engine method doing its work) may also run as a job
(`start_job`: a worker thread, progress, cancellation; see control/jobs.py); the same function
runs either way, with ctx.progress set for a job.  The job.* ops manage the jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .. import errors, keys
from ..engine import Engine
from .jobs import Job, Jobs, Progress, accepts_progress, call_with_progress

# Request arguments that carry key material (control/key_ops.py): never kept in a job.
SECRET_ARGS = frozenset({"passphrase", "key_hex", "new_passphrase", "new_key_hex"})

# job.wait's longest wait (seconds): a larger timeout is cut to this (the reply then says the
# job is still running); it also keeps the value within what threading's waits accept.
MAX_WAIT = 86400.0


class Registry(Protocol):
    """The server's NBD connections (control.server.Connections)."""

    def reserve(self, vol: int, what: str, *, live_only: bool = False, epoch: int | None = None,
                force: bool = False) -> AbstractContextManager[int]:
        """Hold off new connections to vol while the block runs; refuse (errors.Busy) if
        matching clients are connected, unless force, which revokes them first.  Yields how
        many were revoked."""
        ...

    def count(self, vol: int) -> int: ...


@dataclass
class Context:
    """What the server gives the ops; all None for the local backend."""

    connections: Registry | None = None
    status: Callable[[], dict[str, Any]] | None = None
    stop: Callable[[], None] | None = None
    jobs: Jobs | None = None  # the server's (or the local backend's) jobs
    emit: Callable[[dict[str, Any]], None] | None = None  # send an event line to this client
    progress: Progress | None = None  # set when the op runs as a job


@dataclass(frozen=True)
class Arg:
    types: tuple[type, ...]
    required: bool = True
    default: Any = None

    @property
    def type_name(self) -> str:
        names = {str: "string", int: "integer", bool: "boolean", float: "number"}
        return " or ".join(names.get(t, t.__name__) for t in self.types)


def req(*types: type) -> Arg:
    return Arg(types)


def opt(*types: type, default: Any = None) -> Arg:
    return Arg(types, required=False, default=default)


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable[..., Any]
    args: dict[str, Arg] = field(default_factory=dict)
    server_only: bool = False
    engine_call: str | None = None  # the Engine method doing the work: the op may run as a job


OPS: dict[str, Op] = {}


def _op(op_name: str, /, server_only: bool = False, engine_call: str | None = None, **args: Arg
        ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        OPS[op_name] = Op(op_name, fn, args, server_only, engine_call)
        return fn
    return register


def job_ops() -> list[str]:
    return sorted(name for name, op in OPS.items() if op.engine_call)


def capabilities(server: bool) -> list[str]:
    return sorted(name for name, op in OPS.items() if server or not op.server_only)


def validate(op: Op, args: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for op.fn, or InvalidArgument naming what is wrong."""
    if not isinstance(args, dict):
        raise errors.InvalidArgument(f"{op.name}: args must be an object")
    unknown = sorted(set(args) - set(op.args))
    if unknown:
        takes = ", ".join(op.args) or "no arguments"
        raise errors.InvalidArgument(f"{op.name}: unknown argument {unknown[0]!r} (takes {takes})")
    out: dict[str, Any] = {}
    for name, spec in op.args.items():
        value = args.get(name)
        if value is None:
            if spec.required:
                raise errors.InvalidArgument(f"{op.name}: missing argument {name!r} "
                                             f"({spec.type_name})")
            out[name] = spec.default
            continue
        # bool is an int in Python, never in the protocol.
        if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
            shown = "" if name in SECRET_ARGS else f" {value!r:.60}"  # no secret in errors
            raise errors.InvalidArgument(f"{op.name}: argument {name!r} must be {spec.type_name}, "
                                         f"not {type(value).__name__}{shown}")
        out[name] = value
    return out


def _prepare(engine: Engine, op: str, args: dict[str, Any], ctx: Context
             ) -> tuple[Op, dict[str, Any]]:
    spec = OPS.get(op)
    if spec is None:
        raise errors.Unsupported(f"unknown operation {op!r} (known: {', '.join(sorted(OPS))})")
    if spec.server_only and ctx.stop is None:
        raise errors.NotRunning(f"{op}: no snapdisk server is running for {engine.path}")
    return spec, validate(spec, args)


def dispatch(engine: Engine, op: str, args: dict[str, Any], ctx: Context | None = None) -> Any:
    ctx = ctx or Context()
    spec, kw = _prepare(engine, op, args, ctx)
    return spec.fn(engine, ctx, **kw)


def start_job(engine: Engine, op: str, args: dict[str, Any], ctx: Context,
              wrap: Callable[[Any], Any] = lambda r: r) -> Job:
    """Validate, then run op in a job (ctx.jobs) and return it at once; errors in the request
    itself are raised here, not reported by the job.  wrap is applied to the op's result."""
    spec, kw = _prepare(engine, op, args, ctx)
    if spec.engine_call is None:
        raise errors.InvalidArgument(f"{op} does not run as a job (jobs: {', '.join(job_ops())})")
    if ctx.jobs is None:
        raise errors.Unsupported(f"{op}: jobs need a server or a local backend")
    cancellable = accepts_progress(getattr(engine, spec.engine_call))
    job_ctx = replace(ctx, emit=None)

    def run(progress: Progress) -> Any:
        return wrap(spec.fn(engine, replace(job_ctx, progress=progress), **kw))

    shown = {k: "<secret>" if k in SECRET_ARGS and v is not None else v for k, v in args.items()}
    return ctx.jobs.start(op, shown, run, cancellable)  # job.list shows no secret


def _reserve(ctx: Context, vol: int, what: str, **kw: Any) -> AbstractContextManager[int]:
    if ctx.connections is None:
        return nullcontext(0)
    return ctx.connections.reserve(vol, what, **kw)


# ---- volumes ------------------------------------------------------------------------------

def _volume(engine: Engine, ctx: Context, name: str) -> dict[str, Any]:
    info = engine.volume_info(name).to_dict()
    info["connections"] = ctx.connections.count(info["id"]) if ctx.connections else 0
    view = engine.policies.volume_view(name)
    info.update({k: view[k] for k in ("policy", "next_slot", "manual_quota", "auto_quota")})
    return info


@_op("volume.create", name=req(str), size_bytes=req(int), encrypt=opt(bool, default=False),
     passphrase=opt(str), key_hex=opt(str))
def volume_create(engine: Engine, ctx: Context, name: str, size_bytes: int, encrypt: bool,
                  passphrase: str | None, key_hex: str | None) -> Any:
    secret = None
    if encrypt:  # keys.py; the secret is never logged nor echoed (control/key_ops.py)
        secret = keys.Secret.from_args({"passphrase": passphrase, "key_hex": key_hex})
    elif passphrase is not None or key_hex is not None:
        raise errors.InvalidArgument("volume.create: a passphrase or key without encrypt")
    engine.create_volume(name, size_bytes, encrypt=secret)
    return _volume(engine, ctx, name)


@_op("volume.list")
def volume_list(engine: Engine, ctx: Context) -> Any:
    out = [v.to_dict() for v in engine.list_volumes()]
    for v in out:
        v["connections"] = ctx.connections.count(v["id"]) if ctx.connections else 0
    return out


@_op("volume.info", name=req(str))
def volume_info(engine: Engine, ctx: Context, name: str) -> Any:
    return _volume(engine, ctx, name)


@_op("volume.resize", name=req(str), size_bytes=req(int))
def volume_resize(engine: Engine, ctx: Context, name: str, size_bytes: int) -> Any:
    # Connected clients keep the size they negotiated (NBD fixes it at the handshake); new
    # connections see the new one.  Growing never invalidates what they read.
    engine.resize_volume(name, size_bytes)
    return _volume(engine, ctx, name)


@_op("volume.delete", engine_call="delete_volume", name=req(str))
def volume_delete(engine: Engine, ctx: Context, name: str) -> Any:
    vol = engine.volume_id(name)
    with _reserve(ctx, vol, f"delete volume {name!r}"):
        call_with_progress(engine.delete_volume, name, progress=ctx.progress)
    return {"volume": name, "deleted": True}


# ---- snapshots ----------------------------------------------------------------------------

@_op("snapshot.create", volume=req(str), name=opt(str), kind=opt(str, default="manual"),
     policy=opt(str))
def snapshot_create(engine: Engine, ctx: Context, volume: str, name: str | None, kind: str,
                    policy: str | None) -> Any:
    return engine.create_snapshot(volume, name, kind, policy).to_dict()


@_op("snapshot.list", volume=req(str))
def snapshot_list(engine: Engine, ctx: Context, volume: str) -> Any:
    return [s.to_dict() for s in engine.list_snapshots(volume)]


@_op("snapshot.info", volume=req(str), snapshot=req(str, int))
def snapshot_info(engine: Engine, ctx: Context, volume: str, snapshot: str | int) -> Any:
    return engine.snapshot_info(volume, snapshot).to_dict()


@_op("snapshot.delete", engine_call="delete_snapshot", volume=req(str), snapshot=req(str, int))
def snapshot_delete(engine: Engine, ctx: Context, volume: str, snapshot: str | int) -> Any:
    vol = engine.volume_id(volume)
    epoch = engine.snapshot_id(volume, snapshot)
    with _reserve(ctx, vol, f"delete snapshot {volume}@{snapshot}", epoch=epoch):
        call_with_progress(engine.delete_snapshot, volume, epoch, progress=ctx.progress)
    return {"volume": volume, "snapshot": snapshot, "deleted": True}


@_op("rollback", engine_call="rollback", volume=req(str), snapshot=req(str, int),
     force=opt(bool, default=False))
def rollback(engine: Engine, ctx: Context, volume: str, snapshot: str | int, force: bool) -> Any:
    vol = engine.volume_id(volume)
    epoch = engine.snapshot_id(volume, snapshot)
    # Clients of the live volume would keep blocks cached from before the rollback: refuse, or
    # (force) revoke their connections first.  Snapshot exports are unaffected.
    with _reserve(ctx, vol, f"roll back volume {volume!r}", live_only=True, force=force) as revoked:
        call_with_progress(engine.rollback, volume, epoch, progress=ctx.progress)
    return {"volume": volume, "snapshot": snapshot, "snapshot_id": epoch,
            "disconnected": revoked}


@_op("clone", engine_call="clone", volume=req(str), snapshot=req(str, int), name=req(str),
     new_key=opt(bool, default=False), passphrase=opt(str), key_hex=opt(str))
def clone(engine: Engine, ctx: Context, volume: str, snapshot: str | int, name: str,
          new_key: bool, passphrase: str | None, key_hex: str | None) -> Any:
    if new_key:  # under a new key: a re-encrypting copy (snapcopy.py), nothing shared
        secret = keys.Secret.from_args({"passphrase": passphrase, "key_hex": key_hex})
        call_with_progress(engine.copy_snapshot, volume, snapshot, name, "encrypt", secret,
                           progress=ctx.progress)
    elif passphrase is not None or key_hex is not None:
        raise errors.InvalidArgument("clone: a passphrase or key without new_key")
    else:
        call_with_progress(engine.clone, volume, snapshot, name, progress=ctx.progress)
    return _volume(engine, ctx, name)


# ---- store --------------------------------------------------------------------------------

@_op("usage", volume=opt(str))
def usage(engine: Engine, ctx: Context, volume: str | None) -> Any:
    u = engine.usage(volume)
    for v in u["volumes"]:  # the snapshot counts against both quotas, and the policy
        view = engine.policies.volume_view(v["volume"])
        v.update({k: view[k] for k in ("snapshots_manual", "snapshots_auto", "manual_quota",
                                       "auto_quota", "policy")})
    return u


@_op("check")
def check(engine: Engine, ctx: Context) -> Any:
    report = engine.check()
    return report.to_dict() if hasattr(report, "to_dict") else report


@_op("flush")
def flush(engine: Engine, ctx: Context) -> Any:
    engine.flush()
    return None


@_op("status")
def status(engine: Engine, ctx: Context) -> Any:
    if ctx.status is not None:
        return ctx.status()
    return {"running": False, "store": engine.path}


@_op("stop", server_only=True)
def stop(engine: Engine, ctx: Context) -> Any:
    """Flush, then ask the server to exit once this reply is sent (it closes LMDB on the way)."""
    engine.flush()
    assert ctx.stop is not None
    ctx.stop()
    return {"stopping": True}


# ---- jobs ---------------------------------------------------------------------------------

def _jobs(ctx: Context) -> Jobs:
    if ctx.jobs is None:
        raise errors.Unsupported("jobs need a server or a local backend")
    return ctx.jobs


@_op("job.list")
def job_list(engine: Engine, ctx: Context) -> Any:
    return [j.to_dict() for j in _jobs(ctx).list()]


@_op("job.cancel", job=req(int))
def job_cancel(engine: Engine, ctx: Context, job: int) -> Any:
    """Ask a job to stop; returns at once (job.wait for the end)."""
    j = _jobs(ctx).get(job)
    j.cancel()
    return j.to_dict()


@_op("job.wait", job=req(int), timeout=opt(int, float), events=opt(bool, default=False))
def job_wait(engine: Engine, ctx: Context, job: int, timeout: float | None, events: bool) -> Any:
    """Wait for a job to finish (or timeout seconds); with events, send its progress and
    finished events to this client while waiting.  The reply is the job object."""
    j = _jobs(ctx).get(job)
    limit = MAX_WAIT if timeout is None else min(max(float(timeout), 0.0), MAX_WAIT)
    if events and ctx.emit is not None:
        for event in j.events(limit):  # ends with the finished event, or at the limit
            ctx.emit(event)
        return j.to_dict()
    return j.wait(limit)


# The key.* ops of encrypted volumes (control/key_ops.py), the policy, config and quota ops
# (control/policy_ops.py), and the disaster-recovery ops: diff (diff_ops.py), image export and
# import (image_ops.py), send and receive (stream_ops.py), backups to S3-compatible object
# storage (backup_ops.py) register themselves in OPS.
from . import backup_ops, diff_ops, image_ops, key_ops, policy_ops, stream_ops  # noqa: E402,F401
