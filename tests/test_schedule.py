"""The scheduler's decisions (snapdisk.schedule), a pure function, over simulated years.

The expected slots come from an oracle independent of schedule.slot_instant: walk UTC in
15-minute steps (every transition of the zones tested falls on one) and note each instant whose
local wall time is an hour of the policy on one of its days (first occurrence only), or which
is the first instant after such an hour that the clock skipped.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from snapdisk import errors
from snapdisk import schedule as S

ZONES = ["Europe/Berlin", "America/New_York", "Asia/Shanghai"]
STEP = timedelta(minutes=15)
SIM = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle_slots(hours: frozenset[int], days: frozenset[int], tz: ZoneInfo,
                 start: datetime, end: datetime) -> list[datetime]:
    """Every instant in [start, end] at which a slot falls (UTC, ascending, each once), and the
    nominal local (date, hour) of each."""
    out: list[datetime] = []
    u = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    prev = u.astimezone(tz).replace(tzinfo=None)
    while u <= end:
        u += STEP
        loc = u.astimezone(tz)
        wall = loc.replace(tzinfo=None)
        nominal = []
        if loc.minute == 0 and loc.fold == 0:
            nominal.append(wall)
        if wall - prev > STEP:  # a gap: the hours skipped are taken now
            h = prev.replace(minute=0) + timedelta(hours=1)
            while h < wall:
                nominal.append(h)
                h += timedelta(hours=1)
        prev = wall
        if start <= u <= end and any(n.hour in hours and n.weekday() in days for n in nominal):
            out.append(u)
    return out


# ---- parsing --------------------------------------------------------------------------------

def test_parse_forms() -> None:
    assert S.parse_hours("0,6,12,18") == {0, 6, 12, 18}
    assert S.parse_hours("9-11, 23") == {9, 10, 11, 23}
    assert S.parse_days("daily") == set(range(7))
    assert S.parse_days("mon-fri") == {0, 1, 2, 3, 4}
    assert S.parse_days("mon,wed,sun") == {0, 2, 6}
    assert S.parse_days("Sat-Mon") == {5, 6, 0}
    assert S.parse_days("sunday") == {6}
    assert S.parse_retain("7d") == 7
    assert S.parse_retain("65536") == 65536
    assert S.parse_retain("forever") is None
    assert S.format_days(S.parse_days("mon-fri")) == "mon-fri"
    assert S.format_days(S.parse_days("mon,wed,sun")) == "mon,wed,sun"
    p = S.Policy("daily", S.parse_hours("0,12"), S.parse_days("daily"), 7, 5.0)
    assert S.Policy.from_dict(p.to_dict()) == p
    assert p.summary() == "hours 0,12, days daily, retain 7d"


@pytest.mark.parametrize("parse,text,named,rule", [
    (S.parse_hours, "24", "'24'", "0-23"),
    (S.parse_hours, "0,6,25", "'25'", "0-23"),
    (S.parse_hours, "12-3", "'12-3'", "0-23"),
    (S.parse_hours, "", "''", "0-23"),
    (S.parse_days, "funday", "'funday'", "mon, tue"),
    (S.parse_days, "mon-", "'mon-'", "mon-fri"),
    (S.parse_retain, "0", "'0'", "1-65536 days"),
    (S.parse_retain, "65537d", "'65537d'", "1-65536 days"),
    (S.parse_retain, "1w", "'1w'", "forever"),
])
def test_parse_errors_name_the_value_and_the_range(parse, text, named, rule) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument) as e:
        parse(text)
    assert named in str(e.value) and rule in str(e.value)


def test_policy_checks() -> None:
    with pytest.raises(errors.InvalidName):
        S.Policy("-bad", frozenset({1}), frozenset({1}), 1)
    with pytest.raises(errors.OutOfRange, match="0-23"):
        S.Policy("p", frozenset(), frozenset({1}), 1)
    with pytest.raises(errors.OutOfRange, match="1-65536"):
        S.Policy("p", frozenset({1}), frozenset({1}), 0)
    with pytest.raises(errors.InvalidArgument, match="Mars/Base"):
        S.zone("Mars/Base")
    assert S.zone(S.local_zone_name())
    assert S.parse_instant("2026-03-29T01:59:30+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(errors.InvalidArgument, match="offset"):
        S.parse_instant("2026-03-29T01:59:30")


# ---- slots and daylight saving --------------------------------------------------------------

@pytest.mark.parametrize("zone,day,hour,expect", [
    ("Europe/Berlin", date(2026, 3, 29), 2, "2026-03-29T03:00+02:00"),  # does not exist
    ("Europe/Berlin", date(2026, 3, 29), 3, "2026-03-29T03:00+02:00"),
    ("Europe/Berlin", date(2026, 10, 25), 2, "2026-10-25T02:00+02:00"),  # twice: the first
    ("America/New_York", date(2026, 3, 8), 2, "2026-03-08T03:00-04:00"),
    ("America/New_York", date(2026, 11, 1), 1, "2026-11-01T01:00-04:00"),
    ("Asia/Shanghai", date(2026, 11, 25), 12, "2026-11-25T12:00+08:00"),
    ("Australia/Lord_Howe", date(2026, 10, 4), 2, "2026-10-04T02:30+11:00"),  # a 30 min gap
])
def test_slot_instant(zone: str, day: date, hour: int, expect: str) -> None:
    tz = S.zone(zone)
    s = S.slot_instant(day, hour, tz)
    assert S.slot_text(s, tz) == expect
    assert S.snapshot_name(s, tz) == "auto-" + expect


def test_fall_back_hour_once_and_gap_hours_merge() -> None:
    tz = S.zone("Europe/Berlin")
    p = S.Policy("p", frozenset({1, 2, 3}), frozenset(range(7)), None)
    fall = [S.slot_text(s, tz) for s in S.slots_between(
        p, datetime(2026, 10, 25, tzinfo=tz), datetime(2026, 10, 25, 12, tzinfo=tz), tz)]
    assert fall == ["2026-10-25T01:00+02:00", "2026-10-25T02:00+02:00", "2026-10-25T03:00+01:00"]
    spring = [S.slot_text(s, tz) for s in S.slots_between(
        p, datetime(2026, 3, 29, tzinfo=tz), datetime(2026, 3, 29, 12, tzinfo=tz), tz)]
    assert spring == ["2026-03-29T01:00+01:00", "2026-03-29T03:00+02:00"]  # 2 and 3: one instant


policies = st.builds(
    lambda hours, days, retain: S.Policy("p", frozenset(hours), frozenset(days), retain),
    st.sets(st.integers(0, 23), min_size=1, max_size=4),
    st.sets(st.integers(0, 6), min_size=1),
    st.one_of(st.none(), st.integers(1, 40)))


@pytest.mark.parametrize("zone", ZONES)
@settings(max_examples=6, deadline=None)
@given(p=policies, year=st.integers(2024, 2030))
def test_slots_over_a_year_match_the_oracle(p: S.Policy, zone: str, year: int) -> None:
    tz = S.zone(zone)
    start, end = datetime(year, 1, 1, tzinfo=tz), datetime(year + 1, 1, 1, tzinfo=tz)
    got = list(S.slots_between(p, start - timedelta(seconds=1), end, tz))
    assert got == oracle_slots(p.hours, p.days, tz, start, end)
    for s in got[::37]:  # latest and next agree with the list
        assert S.latest_slot(p, s, tz) == s
        assert S.latest_slot(p, s + timedelta(minutes=59), tz) == s
        assert S.next_slot(p, s - timedelta(seconds=1), tz) == s


# ---- the scheduler over a simulated year ----------------------------------------------------

class Sim:
    """The store as the scheduler sees it, and the log of what it did."""

    def __init__(self, p: S.Policy, quota: int, tz: ZoneInfo):
        self.p, self.quota, self.tz = p, quota, tz
        self.snaps: dict[str, S.AutoSnapshot] = {}
        self.taken: dict[datetime, int] = {}
        self.last_eval: datetime | None = None

    def run(self, now: datetime) -> S.Decision:
        v = S.VolumeView("vm1", self.p.name, self.quota, tuple(self.snaps.values()))
        d = S.decide({self.p.name: self.p}, [v], now, self.tz)
        for a in d.actions:
            if isinstance(a, S.Delete):
                gone = self.snaps.pop(a.snapshot)
                if a.reason == "expired":
                    # exact to the minute: at the first evaluation at or after its expiry
                    assert gone.expires is not None and gone.expires <= now
                    assert self.last_eval is None or gone.expires > self.last_eval
                else:
                    assert a.reason == "quota" and len(self.snaps) == self.quota - 1
                    assert all(gone.created <= s.created for s in self.snaps.values())
            else:
                assert a.name not in self.snaps and a.slot <= now < a.slot + S.GRACE
                assert len(self.snaps) < self.quota
                assert a.expires == S.expiry(a.slot, self.p.retain_days)
                self.taken[a.slot] = self.taken.get(a.slot, 0) + 1
                self.snaps[a.name] = S.AutoSnapshot(a.name, now, S.parse_instant(a.slot_text),
                                                    a.expires, a.policy)
        assert len(self.snaps) <= self.quota
        assert all(s.expires is None or s.expires > now for s in self.snaps.values())
        self.last_eval = now
        return d


@pytest.mark.parametrize("zone", ZONES)
@SIM
@given(p=policies, quota=st.sampled_from([1, 2, 3, 6, 256]), seed=st.integers(0, 2**32))
def test_a_simulated_year(p: S.Policy, zone: str, quota: int, seed: int) -> None:
    """Evaluations at random moments around every slot, the server sometimes down through a
    slot's whole grace window, restarts within the hour: every slot with an evaluation in its
    window is taken exactly once, the others never; none outside the policy; retention exact
    and the quota kept."""
    rnd = random.Random(seed)  # the many timings: from a seed (hypothesis' buffer is too small)
    tz = S.zone(zone)
    start = datetime(2026, 1, 1, tzinfo=tz)
    end = datetime(2027, 1, 1, tzinfo=tz)
    expected = oracle_slots(p.hours, p.days, tz, start, end)
    grace = S.GRACE.total_seconds()
    evals: list[datetime] = []
    for s in expected:
        evals.append(s - timedelta(seconds=rnd.uniform(1, 1800)))
        if rnd.random() < 0.1:  # down through the window: back 5 to 50 minutes later
            evals.append(s + timedelta(seconds=rnd.uniform(grace, 3000)))
        else:  # up: one to three evaluations in the window, then a restart within the hour
            evals += [s + timedelta(seconds=rnd.uniform(0, grace - 1))
                      for _ in range(rnd.randint(1, 3))]
            evals.append(s + timedelta(seconds=rnd.uniform(0, 3500)))
        if p.retain_days is not None and rnd.random() < 0.3:  # just after an expiry
            evals.append(s + timedelta(days=p.retain_days, seconds=rnd.uniform(0, 60)))
    for _ in range(200):
        evals.append(start + (end - start) * rnd.random())
    evals = sorted(e for e in evals if start <= e <= end)
    sim = Sim(p, quota, tz)
    for e in evals:
        sim.run(e)
    window = {s for s in expected if any(s <= e < s + S.GRACE for e in evals[
        _bisect(evals, s):_bisect(evals, s + S.GRACE)])}
    assert set(sim.taken) == window
    assert all(n == 1 for n in sim.taken.values())
    for s in sim.taken:  # within the policy's hours and days, or the instant after a skipped one
        loc = s.astimezone(tz)  # (s is UTC: arithmetic on loc itself would be wall time)
        skipped = (s - timedelta(hours=1)).astimezone(tz).replace(tzinfo=None) \
            != loc.replace(tzinfo=None) - timedelta(hours=1)
        assert skipped or (loc.hour in p.hours and loc.weekday() in p.days)


def _bisect(xs: list[datetime], x: datetime) -> int:
    import bisect
    return bisect.bisect_left(xs, x)


# ---- single decisions -----------------------------------------------------------------------

SH = S.zone("Asia/Shanghai")


def at(text: str) -> datetime:
    return S.parse_instant(text)


def view(p: S.Policy, snaps: list[S.AutoSnapshot], quota: int = 256,
         assigned: float = 0.0) -> S.VolumeView:
    return S.VolumeView("vm1", p.name, quota, tuple(snaps), assigned)


def snap(slot: str, retain: int | None = 7) -> S.AutoSnapshot:
    s = at(slot)
    return S.AutoSnapshot("auto-" + slot, s, s, S.expiry(s, retain), "p")


P = S.Policy("p", frozenset({0, 12}), frozenset(range(7)), 7)


def test_take_names_the_slot_and_records_it() -> None:
    d = S.decide({"p": P}, [view(P, [])], at("2026-11-25T12:00:30+08:00"), SH)
    (t,) = d.takes()
    assert (t.volume, t.policy, t.name) == ("vm1", "p", "auto-2026-11-25T12:00+08:00")
    assert t.slot_text == "2026-11-25T12:00+08:00"
    assert t.expires == at("2026-12-02T12:00+08:00")


def test_restart_within_the_hour_does_not_double_a_slot() -> None:
    taken = [snap("2026-11-25T12:00+08:00")]
    for now in ("2026-11-25T12:00:01+08:00", "2026-11-25T12:04:59+08:00",
                "2026-11-25T12:40:00+08:00"):
        assert S.decide({"p": P}, [view(P, taken)], at(now), SH).actions == []


def test_missed_slot_is_not_taken_late() -> None:
    assert S.decide({"p": P}, [view(P, [])], at("2026-11-25T12:05:00+08:00"), SH).actions == []
    assert S.decide({"p": P}, [view(P, [])], at("2026-11-25T12:04:59+08:00"), SH).takes()


def test_policy_changes_apply_from_the_next_slot() -> None:
    now = at("2026-11-25T12:01:00+08:00")
    changed = S.Policy("p", P.hours, P.days, P.retain_days, changed=now.timestamp() - 30)
    assert S.decide({"p": changed}, [view(changed, [])], now, SH).actions == []
    assert S.decide({"p": P}, [view(P, [], assigned=now.timestamp() - 30)], now, SH).actions == []
    assert S.decide({"p": P}, [view(P, [])], now, SH).takes()


def test_retention_exact_to_the_minute() -> None:
    s = snap("2026-11-18T12:00+08:00", 7)
    before = S.decide({"p": P}, [view(P, [s])], at("2026-11-25T11:59:59+08:00"), SH)
    assert before.actions == []
    after = S.decide({"p": P}, [view(P, [s])], at("2026-11-25T12:00:00+08:00"), SH)
    assert after.deletes() == [S.Delete("vm1", s.name, "expired")]
    assert [t.name for t in after.takes()] == ["auto-2026-11-25T12:00+08:00"]
    forever = snap("2000-01-01T00:00+08:00", None)
    assert S.decide({}, [view(P, [forever])], at("2099-01-01T00:00+08:00"), SH).actions == []


def test_retention_outlives_the_policy() -> None:
    """A volume whose policy was deleted: its automatic snapshots still expire, none is taken."""
    s = snap("2026-11-18T12:00+08:00", 7)
    v = S.VolumeView("vm1", None, 256, (s,))
    d = S.decide({}, [v], at("2026-11-25T12:00:00+08:00"), SH)
    assert d.actions == [S.Delete("vm1", s.name, "expired")]


def test_quota_deletes_the_oldest_first() -> None:
    old = [snap(f"2026-11-2{i}T12:00+08:00", None) for i in range(1, 5)]
    now = at("2026-11-25T00:00:10+08:00")
    d = S.decide({"p": P}, [view(P, old[::-1], quota=3)], now, SH)
    assert [(a.snapshot, a.reason) for a in d.deletes()] == [
        (old[0].name, "quota"), (old[1].name, "quota")]
    assert d.actions[-1] == d.takes()[0]
    assert S.decide({"p": P}, [view(P, old, quota=0)], now, SH).actions == []
