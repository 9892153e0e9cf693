"""The server's scheduler thread: takes automatic snapshots at their policies' slots and
deletes expired ones, by applying schedule.decide's actions through the engine.

    sched = Scheduler(engine, connections=svc.connections, clock=Clock(path_or_None))
    sched.start() ... sched.stop()

It evaluates every EVERY_S seconds, and at once when the clock jumps (a `serve --clock FILE`
line changed, or the system clock moved by more than a few seconds).  The decisions are a pure
function of the store and the time (schedule.py); this thread only reads, decides and acts,
so a crash or restart at any point is harmless: an action taken is in the store, one not taken
is decided again next time (within the slot's grace).

Not holding up I/O: a snapshot is an O(1) transaction under the I/O gate; a delete runs its
transaction without the gate (snapshots.py), on this thread, never on an NBD thread.  A
snapshot that an NBD client has open as an export is not deleted under it: it is skipped
(the connections registry refuses, errors.Busy) and retried at the next evaluation.

`serve --clock FILE` (for tests, documented as such in docs/cli.md): "now" is read from FILE,
one ISO-8601 line with an offset (2026-03-29T01:59:30+01:00), re-read every POLL_S; an
unreadable or malformed line keeps the last good time (logged once per distinct line).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any, Protocol

from . import errors
from . import schedule as S
from .engine import Engine

POLL_S = 0.1  # how often the clock is read
EVERY_S = 2.0  # evaluate at least this often
JUMP_S = 5.0  # a system clock step beyond this (vs. monotonic time) evaluates at once


def _log(msg: str) -> None:
    sys.stderr.write(f"snapdisk: scheduler: {msg}\n")
    sys.stderr.flush()


class Clock:
    """The system clock, or (path given) the time written in a file."""

    def __init__(self, path: str | None = None):
        self.path = path
        self._last: datetime | None = None
        self._bad: str | None = None

    def now(self) -> datetime:
        if self.path is None:
            return datetime.now(UTC)
        try:
            with open(self.path) as f:
                line = f.readline().strip()
            t = S.parse_instant(line)
        except (OSError, errors.SnapdiskError) as e:
            text = str(e)
            if text != self._bad:
                _log(f"clock file {self.path}: {text} (keeping the last time read)")
                self._bad = text
            if self._last is None:
                return datetime.now(UTC)
            return self._last
        self._last = t.astimezone(UTC)
        return self._last


class Registry(Protocol):
    def reserve(self, vol: int, what: str, *, live_only: bool = False, epoch: int | None = None,
                force: bool = False) -> AbstractContextManager[int]: ...


class Scheduler:
    def __init__(self, engine: Engine, clock: Clock, connections: Registry | None = None):
        self.engine = engine
        self.clock = clock
        self.connections = connections
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # What the status op shows (the same dict, updated in place, keys fixed: the control
        # server may be encoding it meanwhile).
        self.state: dict[str, Any] = {"clock": clock.path or "system", "evaluations": 0,
                                      "now": None, "actions": []}

    def start(self) -> threading.Thread:
        self.engine.policies.clock = self.clock.now
        self._thread = threading.Thread(target=self._run, name="snapdisk-scheduler",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        last_eval = -1e9
        last_now: datetime | None = None
        skew = time.time() - time.monotonic()
        while not self._stop.is_set():
            try:
                now = self.clock.now()
            except Exception as e:  # never let the thread die: the server would stop protecting
                _log(f"cannot read the clock: {e}")
                self._stop.wait(EVERY_S)
                continue
            mono = time.monotonic()
            new_skew = time.time() - mono
            jumped = (now != last_now if self.clock.path is not None
                      else abs(new_skew - skew) > JUMP_S)
            skew = new_skew
            if jumped or mono - last_eval >= EVERY_S:
                last_eval, last_now = mono, now
                try:
                    self.evaluate(now)
                except Exception as e:
                    _log(f"evaluation at {now.isoformat()} failed: {e}")
            self._stop.wait(POLL_S)

    def evaluate(self, now: datetime) -> list[dict[str, Any]]:
        """Decide at now and act; what was done (or skipped, and why)."""
        done: list[dict[str, Any]] = []
        blocked: set[str] = set()  # volumes whose quota could not make room
        for a in self.engine.policies.decide(now).actions:
            if self._stop.is_set():
                break
            try:
                if isinstance(a, S.Take) and a.volume in blocked:
                    # The engine would make room itself, deleting the oldest automatic
                    # snapshot even under a client reading it: wait for the next evaluation.
                    raise errors.Busy(f"no room under {a.volume}'s auto quota yet")
                if isinstance(a, S.Take):
                    s = self.engine.policies.take(a)
                    done.append({"took": f"{a.volume}@{a.name}", "id": s.id})
                    _log(f"took {a.volume}@{a.name} (policy {a.policy})")
                else:
                    self._delete(a)
                    done.append({"deleted": f"{a.volume}@{a.snapshot}", "reason": a.reason})
                    _log(f"deleted {a.volume}@{a.snapshot} ({a.reason})")
            except errors.SnapdiskError as e:
                # Busy (a client has it open), NotFound (deleted meanwhile), AlreadyExists
                # (a manual snapshot took the name): decided again at the next evaluation.
                done.append({"skipped": str(a), "error": e.code})
                _log(f"skipped {a}: {e}")
                if isinstance(a, S.Delete) and a.reason == "quota":
                    blocked.add(a.volume)
        self.state["now"] = now.isoformat()
        self.state["actions"] = done
        self.state["evaluations"] += 1
        return done

    def _delete(self, a: S.Delete) -> None:
        vol = self.engine.volume_id(a.volume)
        epoch = self.engine.snapshot_id(a.volume, a.snapshot)
        what = f"delete snapshot {a.volume}@{a.snapshot} ({a.reason})"
        guard = (nullcontext(0) if self.connections is None
                 else self.connections.reserve(vol, what, epoch=epoch))
        with guard:
            self.engine.delete_snapshot(a.volume, epoch)


__all__ = ["Clock", "Scheduler"]
