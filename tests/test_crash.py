"""Crash test: a child runs a seeded workload (writes, trims, flushes, snapshots, rollbacks,
clones, deletes) and is killed with SIGKILL at random moments.  After each kill the store must
open without repair, pass the integrity check, and hold every write flushed before the kill;
every block holds content that was written to it (never torn, never another block's).

SNAPDISK_CRASH_KILLS sets the number of kills (default 50).
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

sys.path.insert(0, os.path.dirname(__file__))
from crash_worker import NBLOCKS, decode  # noqa: E402
from waiting import wait_until  # noqa: E402

KILLS = int(os.environ.get("SNAPDISK_CRASH_KILLS", "50"))
State = dict[str, Any]  # {"vols": {vol: {lba: seq}}, "snaps": {vol: {name: {lba: seq}}}}


def apply(state: State, rec: dict[str, Any]) -> None:
    op, vols, snaps = rec["op"], state["vols"], state["snaps"]
    if op == "w":
        for i, s in enumerate(rec["seqs"]):
            vols[rec["v"]][rec["lba"] + i] = s
    elif op == "t":
        for b in range(rec["lba"], rec["lba"] + rec["n"]):
            vols[rec["v"]].pop(b, None)
    elif op == "snap":
        snaps[rec["v"]][rec["name"]] = dict(vols[rec["v"]])
    elif op == "rollback":
        vols[rec["v"]] = dict(snaps[rec["v"]][rec["name"]])
    elif op == "clone":
        vols[rec["new"]] = dict(snaps[rec["v"]][rec["name"]])
        snaps[rec["new"]] = {}
    elif op == "delsnap":
        del snaps[rec["v"]][rec["name"]]
    elif op == "delvol":
        del vols[rec["v"]], snaps[rec["v"]]


Since = dict[tuple[str, int], set[int]]


def expectations(log: list[dict[str, Any]], base: State) -> tuple[State, list[State], Since]:
    """From the log since the baseline: the state at the last durability point, the states the
    store may be in now (an unfinished metadata op may or may not have happened), and for each
    block the seqs written or trimmed (0) since that point."""
    model, durable = copy.deepcopy(base), copy.deepcopy(base)
    since: dict[tuple[str, int], set[int]] = {}
    pending: dict[str, Any] | None = None
    for rec in log:
        if rec["op"] == "done":
            if pending is not None and pending["op"] not in ("w", "t"):
                durable = copy.deepcopy(model)
                since = {}
            if pending is not None and pending["op"] == "f":
                durable = copy.deepcopy(model)
                since = {}
            pending = None
            continue
        pending = rec
        if rec["op"] in ("w", "t"):
            blocks = ([(rec["lba"] + i, s) for i, s in enumerate(rec["seqs"])] if rec["op"] == "w"
                      else [(b, 0) for b in range(rec["lba"], rec["lba"] + rec["n"])])
            for b, s in blocks:
                since.setdefault((rec["v"], b), set()).add(s)
        if rec["op"] != "f":
            apply(model, rec)
    candidates = [durable]
    if pending is not None and pending["op"] not in ("w", "t", "f"):
        candidates.append(model)
    return durable, candidates, since


def actual_state(e: Engine) -> State:
    state: State = {"vols": {}, "snaps": {}}
    for v in e.list_volumes():
        vid = v.id
        data = e.read(vid, 0, NBLOCKS * BLOCK_SIZE)
        state["vols"][v.name] = decode_all(data)
        state["snaps"][v.name] = {}
        for s in e.list_snapshots(v.name, with_usage=False):
            sdata = e.read_snapshot(vid, s.id, 0, NBLOCKS * BLOCK_SIZE)
            state["snaps"][v.name][s.name] = decode_all(sdata)
    return state


def decode_all(data: bytes) -> dict[int, int]:
    out = {}
    for b in range(NBLOCKS):
        d = decode(data[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])
        assert d is not None, f"block {b} is torn or garbage"
        lba, seq = d
        if seq:
            assert lba == b, f"block {b} holds block {lba}'s data"
            out[b] = seq
    return out


def verify(actual: State, candidates: list[State], since: Since) -> None:
    errors_by_candidate = []
    for cand in candidates:
        errs = []
        if set(actual["vols"]) != set(cand["vols"]):
            errs.append(f"volumes {sorted(actual['vols'])} != {sorted(cand['vols'])}")
        for vol, blocks in cand["vols"].items():
            got = actual["vols"].get(vol, {})
            for b in range(NBLOCKS):
                ok = {blocks.get(b, 0)} | since.get((vol, b), set())
                if got.get(b, 0) not in ok:
                    errs.append(f"{vol} block {b}: seq {got.get(b, 0)}, expected one of {sorted(ok)}")
            if set(actual["snaps"].get(vol, {})) != set(cand["snaps"][vol]):
                errs.append(f"{vol} snapshots {sorted(actual['snaps'].get(vol, {}))} != "
                            f"{sorted(cand['snaps'][vol])}")
                continue
            for name, sblocks in cand["snaps"][vol].items():
                if actual["snaps"][vol][name] != sblocks:
                    errs.append(f"{vol}@{name} differs from what it was at creation")
        if not errs:
            return
        errors_by_candidate.append(errs[:5])
    raise AssertionError(f"no acceptable state matches: {errors_by_candidate}")


@pytest.mark.slow
def test_kill9_at_random_moments(tmp_path: Path) -> None:
    store, log_path = tmp_path / "store", tmp_path / "ops.log"
    with Engine.create(str(store), StoreConfig(pool_bytes=64 << 20)) as e:
        for name in ("a", "b"):
            e.create_volume(name, NBLOCKS * BLOCK_SIZE)
    base: State = {"vols": {"a": {}, "b": {}}, "snaps": {"a": {}, "b": {}}}
    rng = random.Random(int(os.environ.get("SNAPDISK_CRASH_SEED", "1234")))
    worker = os.path.join(os.path.dirname(__file__), "crash_worker.py")
    seq = 0
    stats = {"records": 0, "metadata_ops": 0, "in_overlay": 0, "batched_unflushed": 0}
    for kill in range(KILLS):
        log_path.write_text("")
        # the group committer's interval: on demand only, the default 5 ms, or every 1 ms
        interval = rng.choice([0, 0, 5000, 1000])
        proc = subprocess.Popen([sys.executable, worker, str(store), str(log_path),
                                 str(rng.randrange(1 << 30)), str(seq), str(interval)],
                                stderr=subprocess.PIPE)
        try:
            # let it get going (interpreter start-up is ~0.3 s), then kill at a random moment:
            # the random sleep is the point of the test, not a wait for a condition
            wait_until(lambda p=proc: log_path.stat().st_size > 0 or p.poll() is not None, 30, 0.01,
                       "the worker's first logged operation")
            time.sleep(rng.uniform(0.0, 0.4))
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        stats["records"] += len(log)
        stats["metadata_ops"] += sum(r["op"] in ("snap", "rollback", "clone", "delsnap", "delvol")
                                     for r in log)
        seq = max([seq] + [s for r in log if r["op"] == "w" for s in r["seqs"]])
        stats["in_overlay"] += _in_overlay(log)
        stats["batched_unflushed"] += _batched_unflushed(log)
        _, candidates, since = expectations(log, base)
        with Engine.open(str(store)) as e:  # opens without repair
            report = e.check()
            assert report.ok, (kill, report.problems)
            base = actual_state(e)
        verify(base, candidates, since)
    assert stats["records"] > KILLS * 10 and stats["metadata_ops"] > KILLS, stats
    # group commit: kills landed between a redirected write and its batch's commit, and between
    # a committed batch and the next FLUSH
    assert stats["in_overlay"] >= KILLS // 5 and stats["batched_unflushed"] >= KILLS // 10, stats


def _writes_done(log: list[dict[str, Any]]) -> list[int]:
    """The overlay's size after each write that returned since the last flush began."""
    out: list[int] = []
    for i, r in enumerate(log):
        if r["op"] == "f":
            out = []
        elif r["op"] == "done" and "pend" in r and i > 0 and log[i - 1]["op"] == "w":
            out.append(r["pend"])
    return out


def _in_overlay(log: list[dict[str, Any]]) -> bool:
    """Killed with acknowledged redirected writes still in the overlay."""
    pend = _writes_done(log)
    return bool(pend) and pend[-1] > 0


def _batched_unflushed(log: list[dict[str, Any]]) -> bool:
    """Killed after a batch committed writes that no FLUSH has covered yet."""
    pend = _writes_done(log)
    return any(p > 0 for p in pend) and pend[-1] == 0
