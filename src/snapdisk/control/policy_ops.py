"""The policy.*, config.* and volume.set control ops (policies.py), registered in ops.OPS."""

from __future__ import annotations

from typing import Any

from .. import errors
from ..engine import Engine
from .ops import Context, _op, _volume, opt, req


@_op("policy.create", name=req(str), hours=req(str), days=req(str), retain=req(str))
def policy_create(engine: Engine, ctx: Context, name: str, hours: str, days: str,
                  retain: str) -> Any:
    return engine.policies.create(name, hours, days, retain)


@_op("policy.list")
def policy_list(engine: Engine, ctx: Context) -> Any:
    return engine.policies.list_all()


@_op("policy.info", name=req(str))
def policy_info(engine: Engine, ctx: Context, name: str) -> Any:
    return engine.policies.info(name)


@_op("policy.update", name=req(str), hours=opt(str), days=opt(str), retain=opt(str))
def policy_update(engine: Engine, ctx: Context, name: str, hours: str | None,
                  days: str | None, retain: str | None) -> Any:
    return engine.policies.update(name, hours, days, retain)


@_op("policy.delete", name=req(str))
def policy_delete(engine: Engine, ctx: Context, name: str) -> Any:
    return engine.policies.delete(name)


def _names(value: list[Any], what: str) -> list[str]:
    if not value or not all(isinstance(v, str) for v in value):
        raise errors.InvalidArgument(f"{what}: a non-empty list of volume names")
    return value


@_op("policy.apply", name=req(str), volumes=req(list))
def policy_apply(engine: Engine, ctx: Context, name: str, volumes: list[Any]) -> Any:
    return engine.policies.apply(name, _names(volumes, "policy.apply volumes"))


@_op("policy.remove", volumes=req(list))
def policy_remove(engine: Engine, ctx: Context, volumes: list[Any]) -> Any:
    return engine.policies.remove(_names(volumes, "policy.remove volumes"))


@_op("config.get")
def config_get(engine: Engine, ctx: Context) -> Any:
    return engine.policies.config_get()


@_op("config.set", key=req(str), value=req(str, int))
def config_set(engine: Engine, ctx: Context, key: str, value: str | int) -> Any:
    return engine.policies.config_set(key, value)


@_op("volume.set", name=req(str), manual_quota=opt(int), auto_quota=opt(int))
def volume_set(engine: Engine, ctx: Context, name: str, manual_quota: int | None,
               auto_quota: int | None) -> Any:
    engine.policies.volume_set(name, manual_quota, auto_quota)
    return _volume(engine, ctx, name)
