"""Repository locks: a prune never runs beside a backup, restore or verify of its repository.

Why: prune deletes every chunk that no manifest names.  A running backup's new chunks have no
manifest until its last step, and a backup skips uploading the chunks the repository already
holds (listed when it starts); so a prune between that listing and the backup's manifest would
leave the new backup naming deleted chunks: a backup that exists and cannot be restored.
restic's answer, taken here: lock objects in the repository itself (there is no other place
every client of a bucket shares).

Layout (under s3://BUCKET/PREFIX/, beside backup_repo.py's objects):

    locks/KIND-HEX      KIND = "shared" | "exclusive", HEX = 32 random hex digits;
                        JSON {"kind", "op", "host", "pid", "time"} (for error messages only)

Rules and invariants:
- backup, restore and verify hold a shared lock; prune holds an exclusive one.  Shared locks
  coexist; an exclusive lock excludes every other live lock.
- Taking a lock: write our own object first, then list locks/.  On a conflict, delete ours and
  answer Busy naming the holder.  S3 listings are strongly consistent after a put (AWS since
  December 2020; radosgw within one zone), so of two racing takers at least the later one sees
  the earlier; both may see each other and both back off, which is safe (run again).
- A holder rewrites its object every REFRESH seconds (a thread).  A lock whose object was last
  written more than STALE seconds before ours is abandoned (its holder crashed or was killed):
  ignored, and deleted by the next prune.  Ages compare the object store's own LastModified
  stamps (ours, just written, against theirs), so the clients' clocks never matter.
- A holder that could not refresh for STALE / 2 seconds may already look abandoned to others:
  `ensure()` then fails, and the operations call it before their irreversible step (a
  backup's manifest, a prune's deletions), so a lost lock aborts the operation instead of
  racing.  Simplification admitted: between that last check and the step itself (one PUT or a
  few DELETE calls) there is no fence; S3 offers none short of object lock / versioning.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from . import errors
from .s3 import Bucket

LOCKS_DIR = "locks/"
SHARED, EXCLUSIVE = "shared", "exclusive"
REFRESH = 60.0    # seconds between rewrites of a held lock
STALE = 600.0     # a lock not rewritten for this long is abandoned

__all__ = ["EXCLUSIVE", "LOCKS_DIR", "SHARED", "Lock", "hold"]


class Lock:
    def __init__(self, bucket: Bucket, kind: str, op: str):
        if kind not in (SHARED, EXCLUSIVE):
            raise ValueError(kind)
        self.bucket, self.kind, self.op = bucket, kind, op
        self.name = f"{LOCKS_DIR}{kind}-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = 0.0
        self.abandoned: list[str] = []  # other holders' dead locks seen when taking this one

    def _body(self) -> bytes:
        return json.dumps({"kind": self.kind, "op": self.op, "host": socket.gethostname(),
                           "pid": os.getpid(), "time": time.time()}).encode()

    def _write(self) -> None:
        self.bucket.put(self.name, self._body())
        self._last_ok = time.monotonic()

    def acquire(self) -> None:
        self._write()
        try:
            self._check_others()
        except BaseException:
            self._delete()
            raise
        self._thread = threading.Thread(target=self._refresh, name="snapdisk-repo-lock",
                                        daemon=True)
        self._thread.start()

    def _check_others(self) -> None:
        seen = list(self.bucket.list(LOCKS_DIR))
        mine = next((lm for n, _, lm in seen if n == self.name), None)
        if mine is None:  # listing missed our own put: the store is not consistent
            raise errors.ServerError(f"{self.bucket.where(self.name)} was written but is not "
                                     "listed: the object store's listings are not consistent, "
                                     "so the repository cannot be locked")
        for n, _, lm in seen:
            kind = n[len(LOCKS_DIR):].partition("-")[0]
            if n == self.name or kind not in (SHARED, EXCLUSIVE):
                continue
            if mine - lm > STALE:
                self.abandoned.append(n)
            elif EXCLUSIVE in (kind, self.kind):
                raise errors.Busy(f"{self.bucket.where()} is in use: {self._describe(n, mine - lm)}"
                                  f"; {'prune' if self.kind == EXCLUSIVE else self.op} cannot "
                                  f"run beside it (try again when it ends; a lock not "
                                  f"refreshed for {STALE:.0f} s counts as abandoned)")

    def _describe(self, name: str, age: float) -> str:
        try:
            d = json.loads(self.bucket.get(name))
            who = f"{d.get('op', '?')} (host {d.get('host', '?')}, pid {d.get('pid', '?')})"
        except (errors.SnapdiskError, ValueError, TypeError, AttributeError):
            who = name  # gone meanwhile, or not ours to read: its name says enough
        return f"{who} holds a lock refreshed {max(age, 0):.0f} s ago"

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH):
            with contextlib.suppress(errors.SnapdiskError):
                self._write()  # a failure: ensure() reports it once the lock may look abandoned

    def ensure(self) -> None:
        """Fail if the lock may look abandoned to others (not rewritten for STALE / 2)."""
        if time.monotonic() - self._last_ok > STALE / 2:
            raise errors.ServerError(f"lost the lock on {self.bucket.where()} (not refreshed for "
                                     f"{time.monotonic() - self._last_ok:.0f} s): {self.op} "
                                     "stopped before its last step; run it again")

    def _delete(self) -> None:
        with contextlib.suppress(errors.SnapdiskError):
            self.bucket.delete([self.name])  # a failure: it goes stale, a prune deletes it

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._delete()


@contextmanager
def hold(bucket: Bucket, kind: str, op: str) -> Iterator[Lock]:
    lk = Lock(bucket, kind, op)
    lk.acquire()
    try:
        yield lk
    finally:
        lk.release()
