"""Snapshot policies and the scheduler's decisions, as pure functions (no store, no clock).

A policy names the hours (any of 0-23) and the days (any of Monday-Sunday) at which the
volumes it covers are snapshotted, and how long those automatic snapshots are kept (1-65536
days, or forever).  The server's scheduler thread reads the store, calls `decide()` with the
time it reads, and applies the actions it returns; everything it decides is here, so that it
can be tested over a simulated year without a server.

Slots.  A slot is the instant a policy's (local date, hour) falls on in the store's time zone
(an IANA zone, via zoneinfo).  Daylight saving:
  * an hour that does not exist that day (spring forward: 02:00 in Berlin on the last Sunday
    of March) is taken at the first instant after it (03:00+02:00).  If the policy also has
    the hour the clock jumps to, both land on the same instant and are one slot, one snapshot;
  * an hour that occurs twice (fall back) is taken once, at its first occurrence.
A snapshot is named after its slot's instant in local time, `auto-2026-11-25T12:00+08:00`, and
records the slot in its metadata: the slot's identity is that instant.

Taken at most once, never late.  At a time `now`, the slot due for a volume is the latest slot
of its policy at or before now, if (1) it is not older than GRACE (5 minutes), (2) no automatic
snapshot of the volume records it, and (3) it is not before the policy's last change or the
volume's assignment to it ("from the next slot").  So a restart within the hour never doubles
a slot (the store remembers it), and a slot whose whole grace window passed while no server
ran (or the scheduler could not run) is missed, not taken late: a snapshot named 12:00 holds
what the volume held at 12:00, give or take the grace.  The server evaluates every few
seconds, well inside the grace.

Retention is exact: an automatic snapshot expires at its slot + N days of 24 hours (absolute
time, not calendar days: a retention across a DST change is N*24 hours), recorded in the
snapshot when taken, so that later policy changes or deletion leave it as it was.  It is
deleted at the first evaluation at or after that instant.  Manual snapshots are never
decided on here.

Quota: before a volume takes an automatic snapshot with `auto_quota` or more automatic
snapshots left (after expiry), the oldest ones are deleted until one fits.  A quota of 0 takes
nothing.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from . import errors

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MAX_RETAIN_DAYS = 65536
GRACE = timedelta(minutes=5)
POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOURS_RULE = "hours are 0-23, as a list like 0,6,12,18 or a range like 9-17"
DAYS_RULE = ("days are mon, tue, wed, thu, fri, sat, sun, as a list like mon,wed,sun, "
             "a range like mon-fri, or daily")
RETAIN_RULE = f"retention is 1-{MAX_RETAIN_DAYS} days (like 7d), or forever"


# ---- policies ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    name: str
    hours: frozenset[int]
    days: frozenset[int]  # 0 = Monday .. 6 = Sunday
    retain_days: int | None  # None: forever
    changed: float = 0.0  # when created or last updated (epoch seconds): slots before it are not taken

    def __post_init__(self) -> None:
        check_policy_name(self.name)
        if not self.hours or any(not isinstance(h, int) or not 0 <= h <= 23 for h in self.hours):
            raise errors.OutOfRange(f"invalid hours {sorted(self.hours)!r}: {HOURS_RULE}")
        if not self.days or any(not isinstance(d, int) or not 0 <= d <= 6 for d in self.days):
            raise errors.OutOfRange(f"invalid days {sorted(self.days)!r}: {DAYS_RULE}")
        if self.retain_days is not None and not (
                isinstance(self.retain_days, int) and 1 <= self.retain_days <= MAX_RETAIN_DAYS):
            raise errors.OutOfRange(f"invalid retention {self.retain_days!r} days: {RETAIN_RULE}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hours": sorted(self.hours),
                "days": [DAY_NAMES[d] for d in sorted(self.days)],
                "retain_days": self.retain_days, "changed": self.changed,
                "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        return cls(d["name"], frozenset(int(h) for h in d["hours"]),
                   frozenset(DAY_NAMES.index(x) for x in d["days"]),
                   None if d["retain_days"] is None else int(d["retain_days"]),
                   float(d.get("changed", 0.0)))

    def summary(self) -> str:
        return (f"hours {format_hours(self.hours)}, days {format_days(self.days)}, "
                f"retain {format_retain(self.retain_days)}")


def check_policy_name(name: str) -> None:
    if not isinstance(name, str) or not POLICY_NAME.fullmatch(name):
        raise errors.InvalidName(
            f"invalid policy name {name!r}: 1-64 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def parse_hours(text: str) -> frozenset[int]:
    """'0,6,12,18', '9-17', '0-23', or a mix ('0,9-17')."""
    hours: set[int] = set()
    for part in _parts(text, HOURS_RULE):
        lo, dash, hi = part.partition("-")
        if dash and not (lo.strip() and hi.strip()):
            raise errors.OutOfRange(f"invalid hour range {part!r} in {text!r}: {HOURS_RULE}")
        a = _hour(lo, text)
        b = _hour(hi, text) if dash else a
        if a > b:
            raise errors.OutOfRange(f"invalid hour range {part!r}: it runs backwards; {HOURS_RULE}")
        hours.update(range(a, b + 1))
    return frozenset(hours)


def _hour(s: str, text: str) -> int:
    s = s.strip()
    if not s.isascii() or not s.isdigit() or not 0 <= int(s) <= 23:
        raise errors.OutOfRange(f"invalid hour {s!r} in {text!r}: {HOURS_RULE}")
    return int(s)


def parse_days(text: str) -> frozenset[int]:
    """'daily', 'mon-fri', 'mon,wed,sun', 'sat-mon' (a range wraps past Sunday), full names."""
    if text.strip().lower() in ("daily", "all", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in _parts(text, DAYS_RULE):
        lo, dash, hi = part.partition("-")
        if dash and not (lo.strip() and hi.strip()):
            raise errors.OutOfRange(f"invalid day range {part!r} in {text!r}: {DAYS_RULE}")
        a = _day(lo, text)
        b = _day(hi, text) if dash else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _day(s: str, text: str) -> int:
    s = s.strip().lower()
    for names in (DAY_NAMES, FULL_DAY_NAMES):
        if s in names:
            return names.index(s)
    raise errors.OutOfRange(f"invalid day {s!r} in {text!r}: {DAYS_RULE}")


def parse_retain(text: str) -> int | None:
    """'7d', '7' (days), 'forever' -> days, or None for forever."""
    s = text.strip().lower()
    if s == "forever":
        return None
    digits = s[:-1] if s.endswith("d") else s
    if not digits.isascii() or not digits.isdigit() or not 1 <= int(digits) <= MAX_RETAIN_DAYS:
        raise errors.OutOfRange(f"invalid retention {text!r}: {RETAIN_RULE}")
    return int(digits)


def _parts(text: str, rule: str) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise errors.InvalidArgument(f"empty value {text!r}: {rule}")
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise errors.InvalidArgument(f"invalid list {text!r} (an empty item): {rule}")
    return parts


def format_hours(hours: Iterable[int]) -> str:
    return ",".join(str(h) for h in sorted(hours))


def format_days(days: Iterable[int]) -> str:
    ds = sorted(days)
    if len(ds) == 7:
        return "daily"
    if len(ds) > 2 and ds == list(range(ds[0], ds[-1] + 1)):
        return f"{DAY_NAMES[ds[0]]}-{DAY_NAMES[ds[-1]]}"
    return ",".join(DAY_NAMES[d] for d in ds)


def format_retain(retain_days: int | None) -> str:
    return "forever" if retain_days is None else f"{retain_days}d"


# ---- time zones -------------------------------------------------------------------------------

def zone(name: str) -> ZoneInfo:
    """The IANA zone called name, or a clear error."""
    try:
        if not isinstance(name, str) or not name or name.startswith(("/", ".")) or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise errors.InvalidArgument(
            f"unknown time zone {name!r}: an IANA zone name like Europe/Berlin, "
            "America/New_York, Asia/Shanghai or UTC") from None


def local_zone_name() -> str:
    """The system's local zone: $TZ if it names one, else /etc/localtime's link target, else
    /etc/timezone, else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    except OSError:
        pass
    try:
        with open("/etc/timezone") as f:
            candidates.append(f.read().strip())
    except OSError:
        pass
    for c in candidates:
        if c and c in _installed_zones():
            return c
    return "UTC"


@functools.cache
def _installed_zones() -> frozenset[str]:
    """available_timezones(), once per process: it opens every file under the zoneinfo
    directory (~600 here), and the server's scheduler asks every 2 s (~8 ms of CPU each time,
    while NBD requests wait for the GIL).  A zone installed later counts after a restart."""
    return frozenset(available_timezones())


# ---- slots ------------------------------------------------------------------------------------

def slot_instant(day: date, hour: int, tz: ZoneInfo) -> datetime:
    """The instant of (day, hour:00) in tz: its first occurrence if it occurs twice, the first
    instant after it if it does not exist (a DST gap).  In UTC: arithmetic and comparisons of
    two datetimes sharing one ZoneInfo use wall time and ignore fold (PEP 495), so instants
    are kept in UTC and only shown in the zone."""
    wall = datetime(day.year, day.month, day.day, hour)
    early = wall.replace(tzinfo=tz)  # fold=0: the offset before a transition
    utc = early.astimezone(UTC)
    if utc.astimezone(tz).replace(tzinfo=None) == wall:
        return utc
    # A gap.  PEP 495: fold=0 maps a missing time with the offset before the transition (an
    # instant after it), fold=1 with the offset after (an instant before it); the first instant
    # whose wall time is >= wall lies between.  Bisect on whole seconds (UTC offsets are).
    lo = int(wall.replace(tzinfo=tz, fold=1).timestamp())  # wall time < wall here
    hi = int(early.timestamp())  # wall time >= wall here
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _day_slots(policy: Policy, day: date, tz: ZoneInfo) -> list[datetime]:
    if day.weekday() not in policy.days:
        return []
    return [slot_instant(day, h, tz) for h in sorted(policy.hours)]


def slots_between(policy: Policy, start: datetime, end: datetime, tz: ZoneInfo
                  ) -> Iterator[datetime]:
    """The policy's slots s with start < s <= end, in order, each once."""
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    day = start.astimezone(tz).date() - timedelta(days=1)
    last: datetime | None = None
    while day <= end.astimezone(tz).date():
        for s in _day_slots(policy, day, tz):
            if start < s <= end and s != last:
                last = s
                yield s
        day += timedelta(days=1)


def latest_slot(policy: Policy, now: datetime, tz: ZoneInfo) -> datetime | None:
    """The policy's last slot at or before now (None: none in the past 8 days: cannot be, since
    a policy has at least one day and hour)."""
    now = now.astimezone(UTC)
    day = now.astimezone(tz).date()
    for _ in range(9):
        for s in reversed(_day_slots(policy, day, tz)):
            if s <= now:
                return s
        day -= timedelta(days=1)
    return None


def next_slot(policy: Policy, now: datetime, tz: ZoneInfo) -> datetime | None:
    """The policy's first slot after now."""
    now = now.astimezone(UTC)
    day = now.astimezone(tz).date() - timedelta(days=1)
    for _ in range(10):
        for s in _day_slots(policy, day, tz):
            if s > now:
                return s
        day += timedelta(days=1)
    return None


def slot_text(slot: datetime, tz: ZoneInfo) -> str:
    """A slot as recorded and named: local time to the minute with its offset."""
    return slot.astimezone(tz).isoformat(timespec="minutes")


def snapshot_name(slot: datetime, tz: ZoneInfo) -> str:
    return "auto-" + slot_text(slot, tz)


def expiry(slot: datetime, retain_days: int | None) -> datetime | None:
    return None if retain_days is None else slot + timedelta(days=retain_days)


def parse_instant(text: str) -> datetime:
    """An ISO-8601 timestamp with an offset (a slot, an expiry, a line of `serve --clock`)."""
    try:
        t = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        t = None
    if t is None or t.tzinfo is None or t.utcoffset() is None:
        raise errors.InvalidArgument(
            f"invalid timestamp {text!r}: ISO-8601 with an offset, like 2026-03-29T01:59:30+01:00")
    return t


# ---- decisions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoSnapshot:
    """An automatic snapshot of a volume, as the scheduler sees it."""

    name: str
    created: datetime
    slot: datetime | None = None
    expires: datetime | None = None
    policy: str | None = None


@dataclass(frozen=True)
class VolumeView:
    """A volume, as the scheduler sees it: its policy and its automatic snapshots."""

    name: str
    policy: str | None
    auto_quota: int
    snapshots: tuple[AutoSnapshot, ...] = ()
    assigned: float = 0.0  # when the policy was applied (epoch seconds)


@dataclass(frozen=True)
class Take:
    volume: str
    policy: str
    slot: datetime  # UTC
    slot_text: str  # local, as recorded: 2026-11-25T12:00+08:00
    name: str  # auto-<slot_text>
    expires: datetime | None  # UTC


@dataclass(frozen=True)
class Delete:
    volume: str
    snapshot: str
    reason: str  # "expired" or "quota"


Action = Take | Delete


@dataclass
class Decision:
    actions: list[Action] = field(default_factory=list)

    def takes(self) -> list[Take]:
        return [a for a in self.actions if isinstance(a, Take)]

    def deletes(self) -> list[Delete]:
        return [a for a in self.actions if isinstance(a, Delete)]


def decide(policies: Mapping[str, Policy], volumes: Iterable[VolumeView], now: datetime,
           tz: ZoneInfo, grace: timedelta = GRACE) -> Decision:
    """What the scheduler does at now: per volume, in order, delete its expired automatic
    snapshots, then (if a slot is due) delete the oldest ones past its quota and take one."""
    if now.tzinfo is None:
        raise errors.InvalidArgument("the scheduler's now must carry a time zone")
    now = now.astimezone(UTC)
    out = Decision()
    for v in volumes:
        kept = []
        for s in v.snapshots:
            if s.expires is not None and s.expires <= now:
                out.actions.append(Delete(v.name, s.name, "expired"))
            else:
                kept.append(s)
        policy = policies.get(v.policy) if v.policy is not None else None
        if policy is None or v.auto_quota <= 0:
            continue
        slot = latest_slot(policy, now, tz)
        if (slot is None or now - slot >= grace
                or slot.timestamp() < max(policy.changed, v.assigned)
                or any(s.slot == slot for s in v.snapshots)):
            continue
        kept.sort(key=lambda s: (s.created, s.slot or s.created, s.name))
        while len(kept) >= v.auto_quota:
            out.actions.append(Delete(v.name, kept.pop(0).name, "quota"))
        out.actions.append(Take(v.name, policy.name, slot, slot_text(slot, tz),
                                snapshot_name(slot, tz), expiry(slot, policy.retain_days)))
    return out


__all__ = ["GRACE", "MAX_RETAIN_DAYS", "Action", "AutoSnapshot", "Decision", "Delete", "Policy",
           "Take", "VolumeView", "check_policy_name", "decide", "expiry", "format_days",
           "format_hours", "format_retain", "latest_slot", "local_zone_name", "next_slot",
           "parse_days", "parse_hours", "parse_instant", "parse_retain", "slot_instant",
           "slot_text", "slots_between", "snapshot_name", "zone"]
