"""`diff`: the changed extents between snapshots (diff.py), against a model of the bytes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Served
from e2e_helpers import CLIResult, run_cli

from snapdisk import diff, errors
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig

BS = BLOCK_SIZE
MiB = 1 << 20
NBLOCKS = 256


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=64 * MiB))
    yield e
    e.close()


def blocks_of(changes: list[diff.Change]) -> set[int]:
    out: set[int] = set()
    for c in changes:
        assert c.offset % BS == 0 and c.length % BS == 0 and c.length > 0
        out.update(range(c.offset // BS, (c.offset + c.length) // BS))
    return out


def content(e: Engine, vol: int, epoch: int | None) -> list[bytes]:
    data = e.read(vol, 0, NBLOCKS * BS) if epoch is None else \
        e.read_snapshot(vol, epoch, 0, NBLOCKS * BS)
    return [data[i * BS:(i + 1) * BS] for i in range(NBLOCKS)]


def random_history(e: Engine, rng: random.Random, name: str, rounds: int,
                   touched: list[set[int]]) -> list[str]:
    """Writes (runs of blocks, sub-block pieces), trims and zeroes, a snapshot per round;
    touched[i] collects the blocks written in round i."""
    vol = e.volume_id(name)
    snaps = []
    for r in range(rounds):
        t: set[int] = set()
        for _ in range(rng.randrange(1, 12)):
            b = rng.randrange(NBLOCKS)
            n = min(rng.randrange(1, 6), NBLOCKS - b)
            kind = rng.random()
            if kind < 0.65:
                e.write(vol, b * BS, rng.randbytes(n * BS))
            elif kind < 0.75:
                e.write(vol, b * BS + 100, rng.randbytes(50))  # a sub-block write
                n = 1
            elif kind < 0.9:
                e.trim(vol, b * BS, n * BS)
            else:
                e.zero(vol, b * BS, n * BS)
            t.update(range(b, b + n))
        touched.append(t)
        snaps.append(e.create_snapshot(name, f"r{r}").name)
    return snaps


@pytest.mark.parametrize("seed", range(6))
def test_diff_matches_the_bytes_between_every_pair(engine: Engine, seed: int) -> None:
    rng = random.Random(seed)
    e = engine
    vol = e.create_volume("v", NBLOCKS * BS).id
    touched: list[set[int]] = []
    snaps = random_history(e, rng, "v", 6, touched)
    if seed % 2:  # a deleted snapshot in the middle drops records only it needed
        e.delete_snapshot("v", snaps.pop(2))
        gone = touched.pop(2)
        touched[2] |= gone  # round 3 (now at 2) holds both rounds' writes
    epochs = [e.snapshot_id("v", s) for s in snaps]
    # Live writes after the last snapshot, left in the group-commit overlay.
    live_t: set[int] = set()
    for _ in range(5):
        b = rng.randrange(NBLOCKS)
        e.write(vol, b * BS, rng.randbytes(BS))
        live_t.add(b)
    views = {ep: content(e, vol, ep) for ep in epochs}
    views[None] = content(e, vol, None)
    targets: list[int | None] = [*epochs, None]
    for i, a in enumerate(epochs):
        for j in range(i + 1, len(targets)):
            b = targets[j]
            got = blocks_of(e.diff("v", a, b))
            differs = {k for k in range(NBLOCKS) if views[a][k] != views[b][k]}
            written = set().union(*touched[i + 1:j + 1]) if b is not None else \
                set().union(*touched[i + 1:], live_t)
            assert differs <= got, (a, b, sorted(differs - got))
            # Where the target has data inside the changed ranges (the rest are holes there).
            changed, data = diff.changed_and_data(e, "v", a, b)
            assert blocks_of(changed) == got
            status = e.block_status(vol, 0, NBLOCKS * BS) if b is None else \
                e.snapshot_block_status(vol, b, 0, NBLOCKS * BS)
            mapped = {k for o, n, alloc in status if alloc for k in range(o // BS, (o + n) // BS)}
            assert blocks_of(data) == got & mapped, (a, b)
            assert got <= written, (a, b, sorted(got - written))
            # The index walk and the block-by-block comparison of the two maps agree.
            with e.native.txn() as t:
                fast = diff._finish(diff.same_volume(t, vol, a, b), NBLOCKS * BS)
                slow = diff._finish(diff._compare(
                    t, diff.Point(vol, a, NBLOCKS * BS), diff.Point(vol, b, NBLOCKS * BS)),
                    NBLOCKS * BS)
            assert fast == slow
    # From empty: every mapped block of the target.
    full = blocks_of(e.diff("v", None, epochs[-1]))
    assert {k for k in range(NBLOCKS) if views[epochs[-1]][k] != bytes(BS)} <= full


def test_diff_of_a_clone_against_its_origin(engine: Engine) -> None:
    e = engine
    rng = random.Random(7)
    vol = e.create_volume("v", NBLOCKS * BS).id
    e.write(vol, 0, rng.randbytes(NBLOCKS * BS))
    e.create_snapshot("v", "base")
    e.clone("v", "base", "c")
    c = e.volume_id("c")
    e.write(c, 10 * BS, rng.randbytes(3 * BS))
    e.trim(c, 100 * BS, BS)
    e.create_snapshot("c", "now")
    e.write(vol, 50 * BS, rng.randbytes(BS))  # the origin moving on changes nothing here
    assert blocks_of(e.diff("c", "base", "now", base_volume="v")) == {10, 11, 12, 100}
    assert blocks_of(e.diff("c", "base", None, base_volume="v")) == {10, 11, 12, 100}


def test_diff_work_follows_the_changes_not_the_volume(tmp_path: Path) -> None:
    """Counted work: 16k records in the volume and 19 snapshots around, 5 blocks changed: the
    index walk yields a handful of records."""
    e = Engine.create(str(tmp_path / "big"), StoreConfig(pool_bytes=256 * MiB))
    vol = e.create_volume("v", 64 * MiB).id
    for b in range(0, 16384, 2):  # one record per block
        e.write(vol, b * BS, b"a" * BS)
    e.create_snapshot("v", "a")
    for b in range(1, 16384, 2):
        e.write(vol, b * BS, b"b" * BS)
    for k in range(18):
        e.create_snapshot("v", f"x{k}")
    a = e.snapshot_id("v", "a")
    e.create_snapshot("v", "pre")
    for b in (3, 5, 1000, 7000, 9001):
        e.write(vol, b * BS, b"c" * BS)
    e.create_snapshot("v", "post")
    pre, post = e.snapshot_id("v", "pre"), e.snapshot_id("v", "post")
    with e.native.txn() as t:
        assert len(diff.same_volume(t, vol, pre, post)) <= 10
        assert len(diff.same_volume(t, vol, a, pre)) == 8192  # every odd block, once
    assert blocks_of(e.diff("v", "pre", "post")) == {3, 5, 1000, 7000, 9001}
    e.close()


def test_diff_refuses_what_it_cannot_answer(engine: Engine) -> None:
    e = engine
    e.create_volume("v", MiB)
    e.create_snapshot("v", "s1")
    e.create_snapshot("v", "s2")
    with pytest.raises(errors.InvalidArgument, match="newer"):
        e.diff("v", "s2", "s1")
    with pytest.raises(errors.SnapshotNotFound):
        e.diff("v", "nope", None)
    with pytest.raises(errors.VolumeNotFound):
        e.diff("w", "s1", None)


def _cli(store: str, *args: str) -> CLIResult:
    return run_cli(store, *args, check=False, timeout=60)


def test_diff_cli_offline_and_through_the_server(tmp_path: Path, served: object) -> None:
    store = str(tmp_path / "store")
    with Engine.create(store, StoreConfig(pool_bytes=64 * MiB)) as e:
        vol = e.create_volume("v", MiB).id
        e.create_snapshot("v", "s1")
        e.write(vol, 8 * BS, b"z" * 2 * BS)
        e.create_snapshot("v", "s2")
    r = _cli(store, "diff", "v@s1", "v@s2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["extents"] == [{"offset": 8 * BS, "length": 2 * BS}]
    assert doc["changed_bytes"] == 2 * BS
    r = _cli(store, "diff", "v@s1", "v")
    assert r.returncode == 0 and "1 changed extent(s)" in r.stdout, r.stdout + r.stderr
    r = _cli(store, "diff", "v", "v@s2")
    assert r.returncode == 2 and "snapshot" in r.stderr
    srv: Served = served(store)  # type: ignore[operator]
    assert srv.call("diff", volume="v", base="s1", target=None)["changed_bytes"] == 2 * BS
    r = _cli(store, "diff", "v@s1", "v@s2", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["extents"][0]["offset"] == 8 * BS
    r = _cli(store, "diff", "v@s2", "v@s1")
    assert r.returncode != 0 and "newer" in r.stderr


def test_fetch_only_the_changed_blocks_over_nbd(tmp_path: Path, served: object) -> None:
    """docs/cli.md's recipe: a copy of the base snapshot plus the changed extents, read over
    NBD with contrib/nbd-fetch-changed, equals the target snapshot."""
    store = str(tmp_path / "store")
    rng = random.Random(3)
    with Engine.create(store, StoreConfig(pool_bytes=64 * MiB)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        e.write(vol, 0, rng.randbytes(2 * MiB))
        e.create_snapshot("v", "s1")
        for _ in range(20):
            e.write(vol, rng.randrange(1024) * BS, rng.randbytes(BS))
        e.trim(vol, 64 * BS, 8 * BS)
        e.create_snapshot("v", "s2")
    srv: Served = served(store)  # type: ignore[operator]
    img = tmp_path / "v.img"
    subprocess.run(["nbdcopy", srv.uri("v@s1"), str(img)], check=True, timeout=60)
    d = _cli(store, "diff", "v@s1", "v@s2", "--json")
    assert d.returncode == 0, d.stderr
    tool = Path(__file__).resolve().parent.parent / "contrib" / "nbd-fetch-changed"
    r = subprocess.run([sys.executable, str(tool), srv.uri("v@s2"), str(img)], input=d.stdout,
                       capture_output=True, text=True, timeout=60, check=True)
    copied = json.loads(r.stdout)["copied_bytes"]
    assert 0 < copied <= 28 * BS
    h = srv.connect("v@s2")
    try:
        assert img.read_bytes() == h.pread(4 * MiB, 0)
    finally:
        h.shutdown()
