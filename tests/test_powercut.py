"""Power-cut test (issue 9): the store's files live on ext4 over a disk that records every
request (tests/powercut.py); a worker runs writes (some FUA), trims, FLUSHes, snapshots,
rollbacks, clones and deletes on the engine; afterwards, for each of CUTS instants spread over
the workload, the harness builds a disk a power cut at that instant could leave (flushed writes
kept, any subset of the unflushed 4 KiB sectors, page caches lost), replays ext4's journal
(ext4 must come back clean: the harness's own check), mounts it, and checks that:

- the store opens (no repair) and `check` passes;
- every control operation that returned before the cut is there (volumes, snapshots);
- every block of every volume and snapshot reads a content it may have: what it held at the
  last durability point before the cut (a completed FLUSH, or a FUA write for that block) or
  something written there since; never torn, never another block's or another volume's.

The default store passes (issue 9: synced commits, group commit with the pool fdatasync()ed
before each batch, control operations synced before they reply).  The unsafe_nosync opt-in
(MDB_NOSYNC) must fail (strict xfail: the risk `--unsafe-no-sync` states).  The controls pass:
a plain file with fdatasync, and the Python write path with each redirected write's data
synced before its map (a patched write path); a plain file without fdatasync must fail.

SNAPDISK_POWERCUT_CUTS (default 50), SNAPDISK_POWERCUT_SECONDS (workload, default 8),
SNAPDISK_POWERCUT_SEED (default 9).  The docs: docs/powercut.md.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import powercut as pc  # noqa: E402
from crash_worker import NBLOCKS  # noqa: E402

CUTS = int(os.environ.get("SNAPDISK_POWERCUT_CUTS", "50"))
SECONDS = float(os.environ.get("SNAPDISK_POWERCUT_SECONDS", "8"))
SEED = int(os.environ.get("SNAPDISK_POWERCUT_SEED", "9"))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "powercut_worker.py")

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(bool(pc.tools_missing()),
                                 reason=f"needs {', '.join(pc.tools_missing())}")]

# A block in the model: (latest seq, seqs it may read now, seqs it ever held).  0 is zeros.
Entry = tuple[int, frozenset[int], frozenset[int]]
View = dict[int, Entry]
EMPTY: Entry = (0, frozenset({0}), frozenset({0}))
CONTROL = ("snap", "rollback", "clone", "delsnap", "delvol")


@dataclass
class Model:
    vols: dict[str, View] = field(default_factory=dict)
    snaps: dict[str, dict[str, View]] = field(default_factory=dict)

    def views(self) -> Iterator[View]:
        yield from self.vols.values()
        for s in self.snaps.values():
            yield from s.values()

    def put(self, vol: str, lba: int, seq: int, durable: bool) -> None:
        latest, may, ever = self.vols[vol].get(lba, EMPTY)
        self.vols[vol][lba] = (seq, frozenset({seq}) if durable else may | {seq}, ever | {seq})

    def maybe(self, vol: str, lba: int, seq: int) -> None:
        """A write that may or may not have happened (it had not returned at the cut)."""
        latest, may, ever = self.vols[vol].get(lba, EMPTY)
        self.vols[vol][lba] = (latest, may | {seq}, ever | {seq})

    def flushed(self) -> None:
        for view in self.views():
            for lba, (latest, _, ever) in view.items():
                view[lba] = (latest, frozenset({latest}), ever)

    def control(self, rec: dict[str, Any]) -> None:
        op, v = rec["op"], rec["v"]
        if op == "snap":
            self.snaps[v][rec["name"]] = dict(self.vols[v])
        elif op == "rollback":
            self.vols[v] = dict(self.snaps[v][rec["name"]])
        elif op == "clone":
            self.vols[rec["new"]] = dict(self.snaps[v][rec["name"]])
            self.snaps[rec["new"]] = {}
        elif op == "delsnap":
            del self.snaps[v][rec["name"]]
        elif op == "delvol":
            del self.vols[v], self.snaps[v]


def blocks_of(rec: dict[str, Any]) -> list[tuple[int, int]]:
    if rec["op"] == "w":
        return [(rec["lba"] + i, s) for i, s in enumerate(rec["seqs"])]
    return [(b, 0) for b in range(rec["lba"], rec["lba"] + rec["n"])]


def candidates_at(ops: list[dict[str, Any]], times: list[float], vols: tuple[str, ...]
                  ) -> Iterator[tuple[list[Model], int]]:
    """For each cut time (ascending): the states the store may be in after a cut then (every
    op that returned before it applied, durable as the contract says; the one in flight
    maybe), and how many control ops had returned."""
    m = Model({v: {} for v in vols}, {v: {} for v in vols})
    pending: dict[str, Any] | None = None
    controls, i = 0, 0
    for t_cut in times:
        while i < len(ops) and ops[i]["t"] < t_cut:
            rec = ops[i]
            i += 1
            if rec["op"] != "done":
                pending = rec if rec["op"] not in ("ready", "end") else None
                continue
            assert pending is not None
            if pending["op"] in ("w", "t"):
                for lba, s in blocks_of(pending):
                    m.put(pending["v"], lba, s, durable=bool(pending.get("fua")))
            elif pending["op"] == "f":
                m.flushed()
            else:
                m.control(pending)
                controls += 1
            pending = None
        if pending is None or pending["op"] == "f":
            yield [m], controls
            continue
        maybe = copy.deepcopy(m)
        if pending["op"] in ("w", "t"):
            for lba, s in blocks_of(pending):
                maybe.maybe(pending["v"], lba, s)
            yield [maybe], controls
        else:
            maybe.control(pending)
            yield [m, maybe], controls


def compare(actual: dict[str, Any], m: Model) -> list[tuple[str, str]]:
    """(category, detail) for each way actual is not a state m allows."""
    errs: list[tuple[str, str]] = []
    if set(actual["vols"]) != set(m.vols):
        errs.append(("lost_op", f"volumes {sorted(actual['vols'])}, expected {sorted(m.vols)}"))
    pairs = []
    for vol in set(actual["vols"]) & set(m.vols):
        pairs.append((vol, actual["vols"][vol], m.vols[vol]))
        got, want = set(actual["snaps"][vol]), set(m.snaps[vol])
        if got != want:
            errs.append(("lost_op", f"{vol} snapshots: missing {sorted(want - got)}, "
                                    f"unexpected {sorted(got - want)}"))
        pairs += [(f"{vol}@{s}", actual["snaps"][vol][s], m.snaps[vol][s]) for s in got & want]
    for name, stamps, view in pairs:
        for lba in range(NBLOCKS):
            stamp, (_, may, ever) = stamps[lba], view.get(lba, EMPTY)
            if stamp is None:
                errs.append(("torn", f"{name} block {lba} is torn or garbage"))
            elif stamp[0] != lba:
                errs.append(("foreign", f"{name} block {lba} holds block {stamp[0]}'s data"))
            elif stamp[1] not in may:
                what = "lost_write" if stamp[1] in ever else "foreign"
                errs.append((what, f"{name} block {lba}: seq {stamp[1]}, may be {sorted(may)}"
                                   f"{' (an older content of its own)' if stamp[1] in ever else ''}"))
    return errs


@dataclass
class Summary:
    cuts: int = 0
    failed: int = 0
    categories: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    controls_checked: int = 0
    pending_cuts: int = 0  # cuts with unflushed sectors on the device

    def fail(self, cats: dict[str, str]) -> None:
        self.failed += 1
        for cat, detail in cats.items():
            self.categories[cat] += 1
            self.examples.setdefault(cat, detail)

    def report(self) -> str:
        return (f"{self.failed} of {self.cuts} cuts failed; cuts per failure kind: "
                f"{dict(self.categories)}; first of each: {self.examples}; "
                f"({self.controls_checked} acknowledged control ops checked, summed over cuts; "
                f"{self.pending_cuts} cuts with unflushed sectors)")


def powercut_run(root: str, mode: str, cuts: int, seconds: float, seed: int) -> Summary:
    """mode: "default", "unsafe-nosync" (the MDB_NOSYNC opt-in), "sync-data" (the Python write
    path with data synced before its map: see powercut_worker.py), or "ref" / "ref-nosync" (the
    controls: a plain file written and fdatasync()ed, or not; see powercut_worker.py)."""
    rng = random.Random(seed)
    wlog = os.path.join(root, "ops.log")
    with pc.recording_fs(root) as rig:
        what = os.path.join(rig.fs, "store")
        ref = mode.startswith("ref")
        args = ([mode, what, wlog, str(rng.randrange(1 << 30))] if ref else
                ["run", what, wlog, str(rng.randrange(1 << 30)), mode])
        worker = rig.spawn([sys.executable, WORKER, *args, str(seconds)], "worker")
        assert worker.wait(timeout=seconds + 120) == 0, "the workload failed"
    with open(wlog) as f:
        ops = [json.loads(line) for line in f]
    start, end = ops[0]["t"], ops[-1]["t"]
    assert ops[0]["op"] == "ready" and ops[-1]["op"] == "end"
    times = pc.cut_times(rig.log, start, end, cuts, rng)
    summary = Summary()
    models = candidates_at(ops, times, ("a",) if ref else ("a", "b"))
    for cut in pc.replay(rig.log, rig.size, times, rng.randrange(1 << 30), root):
        cands, controls = next(models)
        summary.cuts += 1
        summary.pending_cuts += cut.pending_sectors > 0
        where = f"cut {summary.cuts - 1} at +{cut.t - start:.3f} s ({cut.mode}, " \
                f"{cut.kept}/{cut.pending_sectors} unflushed sectors kept)"
        fs_err = pc.recover_fs(cut.image)
        if fs_err:
            summary.fail({"harness_fs": f"{where}: {fs_err}"})
            continue
        r = pc.run_in(cut.image, root, [sys.executable, WORKER,
                                        "refdump" if ref else "dump", "MNT/store"])
        if r.returncode != 0:  # killed by a signal (SIGSEGV in LMDB on a damaged map)
            summary.fail({"crash": f"{where}: exit {r.returncode}: {r.stderr[-600:]}"})
            continue
        actual = json.loads(r.stdout)
        if "failed" in actual:  # open (no repair), check or a read raised
            summary.fail({f"{actual['failed']}_error": f"{where}: {actual['error']}"})
            continue
        summary.controls_checked += controls
        found: dict[str, str] = {}
        if actual["problems"]:
            found["check"] = f"{where}: {actual['problems'][:3]}"
        errs = min((compare(actual, m) for m in cands), key=len)
        for cat, detail in errs:
            found.setdefault(cat, f"{where}: {detail}")
        if found:
            summary.fail(found)
    return summary


@pytest.fixture
def shm_root() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="snapdisk-powercut-", dir="/dev/shm")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _check(summary: Summary, cuts: int) -> None:
    print(summary.report())
    assert summary.cuts == cuts
    assert summary.pending_cuts > cuts // 4, summary.report()  # the cuts did land mid-flight
    assert summary.failed == 0, summary.report()


def test_harness_passes_a_power_cut_safe_writer(shm_root: str) -> None:
    """The positive control: a plain file written with pwrite and made durable with fdatasync
    survives every cut, so the failures below are the store's, not the harness's."""
    _check(powercut_run(shm_root, "ref", 16, 3, SEED), 16)


def test_harness_catches_a_writer_that_does_not_sync(shm_root: str) -> None:
    """The negative control: the same writer, its flushes without fdatasync, loses flushed
    writes (the kernel writes its dirty pages back only after 30 s)."""
    summary = powercut_run(shm_root, "ref-nosync", 10, 2, SEED)
    assert summary.categories["lost_write"] >= 5, summary.report()


def test_power_cut_sync_commits_with_data_synced_first(shm_root: str) -> None:
    """Synced commits plus each redirected write's data fdatasync()ed before its map commits,
    on the Python write path (the worker patches it): passes.  The control for the model of
    snapshots, rollbacks, clones and deletes, independent of group commit."""
    _check(powercut_run(shm_root, "sync-data", 30, 6, SEED), 30)


XFAIL_NOSYNC = pytest.mark.xfail(
    strict=True, reason="unsafe_nosync (MDB_NOSYNC): LMDB's commits reach the disk only at a "
    "FLUSH, so a cut loses control ops that returned, and a cut inside the unordered msync of "
    "a FLUSH can damage the environment (LMDB's documented caveat)")


def test_power_cut_default_mode(shm_root: str) -> None:
    """The default store survives every cut (issue 9 item 0)."""
    _check(powercut_run(shm_root, "default", CUTS, SECONDS, SEED), CUTS)


@pytest.mark.slow
@XFAIL_NOSYNC
def test_power_cut_unsafe_nosync(shm_root: str) -> None:
    """The opt-in fast mode is not power-cut safe: the test can tell."""
    _check(powercut_run(shm_root, "unsafe-nosync", CUTS, SECONDS, SEED), CUTS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "sync-data"])
def test_power_cut_long(shm_root: str, mode: str) -> None:
    _check(powercut_run(shm_root, mode, 4 * CUTS, 2 * SECONDS, SEED + 1), 4 * CUTS)
