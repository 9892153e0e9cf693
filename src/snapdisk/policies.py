"""Snapshot policies, quotas and the store's time zone in the store; the scheduler's reads and
writes of it.  The decisions themselves are schedule.py's (pure); this module keeps them in
LMDB and carries them out through snapshots.py.

Where things live (layout.py): the policies and the time zone in META `config` (a store has a
few policies; each change is one atomic write of that record); a volume's policy
({name, since}) and its own quotas (manual_quota, auto_quota) in its VOLUMES record; an
automatic snapshot's policy, slot and expiry in its SNAPS record.

Deleting a policy removes it from its volumes; the automatic snapshots it made stay and keep
the expiry recorded in them (retention outlives the policy: nothing else would ever delete
them, and keeping them forever would surprise more than expiring as promised).

Times: policy changes and assignments are stamped with `clock()` (the server's clock, which
`serve --clock FILE` replaces for tests) so that "from the next slot" means the same thing to
the scheduler that reads that clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from . import catalog, errors
from . import schedule as S
from .native import NativeStore
from .snapshots import Snapshots, quota_of
from .store import StoreDir

MAX_QUOTA = 1 << 20
CONFIG_KEYS = ("timezone", "manual-snapshot-quota", "auto-snapshot-quota")


def system_clock() -> datetime:
    return datetime.now(UTC)


def check_quota(value: Any, what: str) -> int:
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_QUOTA:
        raise errors.OutOfRange(f"invalid {what} {value!r}: 0-{MAX_QUOTA} snapshots")
    return value


class Policies:
    def __init__(self, sd: StoreDir, snapshots: Snapshots):
        self.sd = sd
        self.native: NativeStore = sd.native
        self.snapshots = snapshots
        self.clock: Callable[[], datetime] = system_clock
        self._lock = threading.Lock()  # config edits: read-modify-write of sd.config

    # ---- the store's options ----------------------------------------------------------------

    def zone_name(self) -> str:
        return self.sd.config.timezone or S.local_zone_name()

    def zone(self) -> ZoneInfo:
        return S.zone(self.zone_name())

    def config_get(self) -> dict[str, Any]:
        c = self.sd.config
        return {"timezone": self.zone_name(), "timezone_set": c.timezone is not None,
                "manual-snapshot-quota": c.manual_snapshot_quota,
                "auto-snapshot-quota": c.auto_snapshot_quota, "sync-commits": not c.unsafe_nosync,
                "pool-bytes": c.pool_bytes, "policies": len(c.policies)}

    def config_set(self, key: str, value: str | int) -> dict[str, Any]:
        with self._lock:
            c = self.sd.config
            if key == "timezone":
                S.zone(str(value))
                c.timezone = str(value)
            elif key == "manual-snapshot-quota":
                c.manual_snapshot_quota = check_quota(value, key)
            elif key == "auto-snapshot-quota":
                c.auto_snapshot_quota = check_quota(value, key)
            else:
                raise errors.InvalidArgument(
                    f"unknown or read-only option {key!r}: settable are {', '.join(CONFIG_KEYS)}")
            self._save_config()
        return self.config_get()

    def _save_config(self) -> None:
        with self.native.txn(write=True) as t:
            self.sd.save_config(t)

    # ---- policies -----------------------------------------------------------------------------

    def get(self, name: str) -> S.Policy:
        d = self.sd.config.policies.get(name) if isinstance(name, str) else None
        if d is None:
            S.check_policy_name(name)
            raise errors.NotFound(f"no policy named {name!r} (`snapdisk policy list` shows them)")
        return self.all()[name]

    def all(self) -> dict[str, S.Policy]:
        try:
            return {n: S.Policy.from_dict(d) for n, d in self.sd.config.policies.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise errors.Corrupt(f"cannot read the store's policies: {e!r}") from None

    def create(self, name: str, hours: str, days: str, retain: str) -> dict[str, Any]:
        p = S.Policy(name, S.parse_hours(hours), S.parse_days(days), S.parse_retain(retain),
                     self.clock().timestamp())
        with self._lock:
            if name in self.sd.config.policies:
                raise errors.AlreadyExists(f"a policy named {name!r} exists")
            self.sd.config.policies[name] = p.to_dict()
            self._save_config()
        return self.info(name)

    def update(self, name: str, hours: str | None = None, days: str | None = None,
               retain: str | None = None) -> dict[str, Any]:
        """Changes apply to every volume that has the policy, from its next slot; snapshots
        already taken keep the expiry they were given."""
        with self._lock:
            old = self.get(name)
            p = S.Policy(name, old.hours if hours is None else S.parse_hours(hours),
                         old.days if days is None else S.parse_days(days),
                         old.retain_days if retain is None else S.parse_retain(retain),
                         self.clock().timestamp())
            self.sd.config.policies[name] = p.to_dict()
            self._save_config()
        return self.info(name)

    def delete(self, name: str) -> dict[str, Any]:
        with self._lock:
            self.get(name)
            removed = []
            with self.native.txn(write=True) as t:
                for vol in catalog.volume_ids(t):
                    rec = catalog.vol_record(t, vol)
                    if (rec.extra.get("policy") or {}).get("name") == name:
                        del rec.extra["policy"]
                        catalog.put_vol_record(t, vol, rec)
                        removed.append(rec.name)
                del self.sd.config.policies[name]
                self.sd.save_config(t)
        return {"policy": name, "deleted": True, "volumes": sorted(removed)}

    def _covered(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.native.txn() as t:
            for vol in catalog.volume_ids(t):
                rec = catalog.vol_record(t, vol)
                name = (rec.extra.get("policy") or {}).get("name")
                if name is not None:
                    out.setdefault(name, []).append(rec.name)
        return out

    def _describe(self, p: S.Policy, volumes: list[str], now: datetime, tz: ZoneInfo
                  ) -> dict[str, Any]:
        nxt = S.next_slot(p, now, tz)
        return {**p.to_dict(), "retain": S.format_retain(p.retain_days),
                "volumes": sorted(volumes), "volume_count": len(volumes),
                "next_slot": None if nxt is None else S.slot_text(nxt, tz),
                "timezone": tz.key}

    def info(self, name: str) -> dict[str, Any]:
        p = self.get(name)
        return self._describe(p, self._covered().get(name, []), self.clock(), self.zone())

    def list_all(self) -> list[dict[str, Any]]:
        covered, now, tz = self._covered(), self.clock(), self.zone()
        return [self._describe(p, covered.get(n, []), now, tz)
                for n, p in sorted(self.all().items())]

    def apply(self, name: str, volumes: Iterable[str]) -> dict[str, Any]:
        """Give each volume the policy (replacing the one it had): its first slot is the next
        one."""
        self.get(name)
        vols = list(volumes)
        since = self.clock().timestamp()
        with self.native.txn(write=True) as t:
            for v in vols:
                vol = catalog.vol_id(t, v)
                rec = catalog.vol_record(t, vol)
                rec.extra["policy"] = {"name": name, "since": since}
                catalog.put_vol_record(t, vol, rec)
        return self.info(name)

    def remove(self, volumes: Iterable[str]) -> dict[str, Any]:
        out: dict[str, str | None] = {}
        with self.native.txn(write=True) as t:
            for v in volumes:
                vol = catalog.vol_id(t, v)
                rec = catalog.vol_record(t, vol)
                out[v] = (rec.extra.pop("policy", None) or {}).get("name")
                catalog.put_vol_record(t, vol, rec)
        return {"removed": out}

    # ---- volumes ------------------------------------------------------------------------------

    def volume_set(self, name: str, manual_quota: int | None = None,
                   auto_quota: int | None = None) -> dict[str, Any]:
        with self.native.txn(write=True) as t:
            vol = catalog.vol_id(t, name)
            rec = catalog.vol_record(t, vol)
            if manual_quota is not None:
                rec.extra["manual_quota"] = check_quota(manual_quota, "manual quota")
            if auto_quota is not None:
                rec.extra["auto_quota"] = check_quota(auto_quota, "auto quota")
            catalog.put_vol_record(t, vol, rec)
        return self.volume_view(name)

    def volume_view(self, name: str) -> dict[str, Any]:
        """A volume's policy, next slot and quotas (volume info shows them)."""
        with self.native.txn() as t:
            rec = catalog.vol_record(t, catalog.vol_id(t, name))
        policy = (rec.extra.get("policy") or {}).get("name")
        nxt = None
        if policy is not None and policy in self.sd.config.policies:
            tz = self.zone()
            s = S.next_slot(self.get(policy), self.clock(), tz)
            nxt = None if s is None else S.slot_text(s, tz)
        return {"volume": rec.name, "policy": policy, "next_slot": nxt,
                "manual_quota": quota_of(self.sd.config, rec.extra, "manual"),
                "auto_quota": quota_of(self.sd.config, rec.extra, "auto"),
                "snapshots_manual": rec.snapshots_manual, "snapshots_auto": rec.snapshots_auto}

    # ---- the scheduler ------------------------------------------------------------------------

    def views(self) -> list[S.VolumeView]:
        """Every volume with a policy or automatic snapshots, as schedule.decide sees it."""
        out = []
        # catalog records only: every 2 s, so it must not apply the pending batch (a read
        # transaction that did made snapshots under load wait for a whole batch)
        with self.native.txn(catalog=True) as t:
            for vol in catalog.volume_ids(t):
                rec = catalog.vol_record(t, vol)
                assigned = rec.extra.get("policy") or {}
                snaps = []
                if rec.snapshots_auto:
                    for epoch in catalog.snap_epochs(t, vol):
                        s = catalog.snap_record(t, vol, epoch)
                        if s.kind == "auto":
                            snaps.append(S.AutoSnapshot(
                                s.name, datetime.fromtimestamp(s.created, UTC),
                                None if s.slot is None else S.parse_instant(s.slot),
                                None if s.expires is None
                                else datetime.fromtimestamp(s.expires, UTC), s.policy))
                if assigned or snaps:
                    out.append(S.VolumeView(rec.name, assigned.get("name"),
                                            quota_of(self.sd.config, rec.extra, "auto"),
                                            tuple(snaps), float(assigned.get("since", 0.0))))
        return out

    def decide(self, now: datetime) -> S.Decision:
        return S.decide(self.all(), self.views(), now, self.zone())

    def take(self, a: S.Take) -> catalog.SnapshotInfo:
        return self.snapshots.create(a.volume, a.name, "auto", a.policy, a.slot_text,
                                     None if a.expires is None else a.expires.timestamp())


__all__ = ["CONFIG_KEYS", "Policies", "check_quota", "system_clock"]
