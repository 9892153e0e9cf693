"""kill -9 in the middle of bulk walks (tests/bulk_crash_worker.py): snapshot deletes,
rollbacks and volume deletes, each many chunks long.  After each kill the store opens without
repair (open finishes the marked work), `check` passes, and every volume holds what the last
completed op left or what the op in flight promised (its intent): nothing flushed is lost.
SNAPDISK_BULK_CRASH_KILLS sets the number of kills (default 20)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from snapdisk import bulk
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig, StoreDir

KILLS = int(os.environ.get("SNAPDISK_BULK_CRASH_KILLS", "20"))
HERE = Path(__file__).parent


def expected(log_path: Path) -> tuple[dict[str, str], dict[str, str | None]]:
    """The last `ok` state and the intent logged after it (if any)."""
    ok: dict[str, str] = {}
    intent: dict[str, str | None] = {}
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if "ok" in rec:
            ok, intent = rec["ok"], {}
        else:
            intent = rec["intent"]
    return ok, intent


def test_kill9_in_the_middle_of_bulk_walks(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from bulk_crash_worker import SIZE, digest

    store = tmp_path / "store"
    log_path = tmp_path / "log"
    with Engine.create(str(store), StoreConfig(pool_bytes=256 << 20)) as e:
        for name in ("a", "b"):
            vol = e.create_volume(name, SIZE).id
            e.write(vol, 0, os.urandom(SIZE))
    rng = random.Random(1)
    env = {**os.environ, "SNAPDISK_BULK_CHUNK": "4"}
    mid_walk = 0
    for kill in range(KILLS):
        proc = subprocess.Popen([sys.executable, str(HERE / "bulk_crash_worker.py"), str(store),
                                 str(log_path), str(kill)], env=env, stderr=subprocess.PIPE)
        try:
            time.sleep(rng.uniform(0.8, 2.0))  # start-up is ~0.4 s
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        sd = StoreDir.open(str(store))
        with sd.native.txn() as t:
            mid_walk += bool(bulk.pending(t))
        with Engine(sd) as e:  # open finishes the marked work
            with e.native.txn() as t:
                assert bulk.pending(t) == []
            report = e.check()
            assert report.ok, (kill, report.problems)
            ok, intent = expected(log_path)
            have = {v.name: digest(e, v.name) for v in e.list_volumes()}
        for name in set(ok) | set(intent) | set(have):
            allowed = {ok.get(name), intent.get(name, ok.get(name))}
            if "*" in allowed:
                continue
            assert have.get(name) in allowed, (kill, name, have.get(name), ok.get(name),
                                               intent.get(name))
    print(f"{mid_walk} of {KILLS} kills landed in a walk")
    assert mid_walk >= KILLS // 10, f"only {mid_walk} of {KILLS} kills landed in a walk"
