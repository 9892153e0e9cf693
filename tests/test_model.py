"""Model-based test of the engine (hypothesis stateful).

Random sequences of write / trim / zero / snapshot / delete-snapshot / rollback / clone /
delete-volume / resize / flush / reopen run against the real engine (real LMDB, real pool file)
and against an in-memory model of every volume and snapshot.  After every step: every volume and
every snapshot reads back as the model says, the capacity figures equal the model's count of
referenced blocks, and the integrity check passes.

Group commit: the committer is off and the overlay bounded at 64 blocks, so redirected writes
wait in the overlay until something applies them; after every step, before anything applies
them (Python read transactions do), the live view is read and its block status taken through
the hot path, which must answer from the overlay; and rewriting a block written since the
volume's last snapshot must go in place (the overlay's in-place check).

The model gives each written block version a unique id; a block's bytes are kept per version.
Capacity in the model: a version is held while some live view or snapshot view maps it; deleting
snapshot S frees the versions only S holds.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from snapdisk import errors, native
from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
_ids = itertools.count(1)


@dataclass
class MVol:
    size_blocks: int
    blocks: dict[int, int] = field(default_factory=dict)  # block -> version id
    snaps: dict[str, tuple[int, dict[int, int]]] = field(default_factory=dict)  # name -> (size, blocks)
    fresh: set[int] = field(default_factory=set)  # written since the last snapshot: in place


class EngineModel(RuleBasedStateMachine):
    volumes = Bundle("volumes")
    c_redirect = True  # redirected writes in C (xm_write), or all in the Python twin

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="snapdisk-model-")
        self.engine = Engine.create(self.dir, StoreConfig(pool_bytes=4096 * BS,
                                                          manual_snapshot_quota=6))
        self.engine._c_redirect = self.c_redirect
        native.batch_config(self.engine.native, 0, 64)  # no committer, a small bound
        self.vids: dict[str, int] = {}
        self.model: dict[str, MVol] = {}
        self.content: dict[int, bytes] = {}
        self.names = itertools.count()

    def teardown(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers --------------------------------------------------------------------------

    def _bytes(self, blocks: dict[int, int], start: int, end: int) -> bytes:
        out = bytearray(end - start)
        for b in range(start // BS, -(-end // BS)):
            v = blocks.get(b)
            if v is None:
                continue
            s, x = max(b * BS, start), min((b + 1) * BS, end)
            out[s - start:x - start] = self.content[v][s - b * BS:x - b * BS]
        return bytes(out)

    def _apply(self, vol: MVol, start: int, data: bytes | None) -> None:
        """Model a write of data (None: zeroes that unmap whole blocks) at byte start."""
        end = start + (len(data) if data is not None else 0)
        for b in range(start // BS, -(-end // BS)):
            s, x = max(b * BS, start), min((b + 1) * BS, end)
            if data is None and s == b * BS and x == (b + 1) * BS:
                vol.blocks.pop(b, None)
                continue
            old = self._bytes(vol.blocks, b * BS, (b + 1) * BS)
            piece = data[s - start:x - start] if data is not None else bytes(x - s)
            new = old[:s - b * BS] + piece + old[x - b * BS:]
            v = next(_ids)
            self.content[v] = new
            vol.blocks[b] = v

    def _vid(self, name: str) -> int:
        if name not in self.vids:  # (a lookup is a Python read: it applies the overlay)
            self.vids[name] = self.engine.volume_id(name)
        return self.vids[name]

    # ---- rules ----------------------------------------------------------------------------

    @rule(target=volumes, size=st.integers(1, 24))
    def create_volume(self, size: int) -> str:
        name = f"v{next(self.names)}"
        self.engine.create_volume(name, size * BS)
        self.model[name] = MVol(size)
        return name

    @rule(vol=volumes, data=st.data())
    def write(self, vol: str, data: st.DataObject) -> None:
        if vol not in self.model:
            return
        m = self.model[vol]
        size = m.size_blocks * BS
        aligned = data.draw(st.booleans())
        if aligned:
            b = data.draw(st.integers(0, m.size_blocks - 1))
            n = data.draw(st.integers(1, min(6, m.size_blocks - b)))
            start, length = b * BS, n * BS
        else:
            start = data.draw(st.integers(0, size // 512 - 1)) * 512
            length = data.draw(st.integers(1, min(24, (size - start) // 512))) * 512
        payload = bytes([next(_ids) % 251 + 1]) * length
        self.engine.write(self._vid(vol), start, payload)
        self._apply(m, start, payload)
        m.fresh.update(range(start // BS, -(-(start + length) // BS)))

    @precondition(lambda self: any(m.fresh for m in self.model.values()))
    @rule(data=st.data())
    def rewrite_fresh(self, data: st.DataObject) -> None:
        """A block written since the volume's last snapshot is rewritten in place, whether its
        record is in LMDB or still in the overlay."""
        name = data.draw(st.sampled_from(sorted(n for n, m in self.model.items() if m.fresh)))
        m = self.model[name]
        b = data.draw(st.sampled_from(sorted(m.fresh)))
        before = self.engine.native.stats()["redirected_writes"]
        self.engine.write(self._vid(name), b * BS, self._bytes(m.blocks, b * BS, (b + 1) * BS))
        assert self.engine.native.stats()["redirected_writes"] == before, (name, b)

    @rule(vol=volumes, data=st.data(), zero=st.booleans())
    def trim_or_zero(self, vol: str, data: st.DataObject, zero: bool) -> None:
        if vol not in self.model:
            return
        m = self.model[vol]
        size = m.size_blocks * BS
        start = data.draw(st.integers(0, size // 512 - 1)) * 512
        length = data.draw(st.integers(1, (size - start) // 512)) * 512
        vid = self._vid(vol)
        if zero:
            self.engine.zero(vid, start, length)
            self._apply(m, start, None)
            self._apply_zero_len(m, start, length)
        else:
            self.engine.trim(vid, start, length)
            lo, hi = -(-start // BS), (start + length) // BS
            for b in range(lo, hi):
                m.blocks.pop(b, None)
        m.fresh.difference_update(range(start // BS, -(-(start + length) // BS)))

    def _apply_zero_len(self, m: MVol, start: int, length: int) -> None:
        end = start + length
        for b in range(start // BS, -(-end // BS)):
            s, x = max(b * BS, start), min((b + 1) * BS, end)
            if s == b * BS and x == (b + 1) * BS:
                m.blocks.pop(b, None)
            else:
                self._apply(m, s, bytes(x - s))

    @rule(vol=volumes)
    def snapshot(self, vol: str) -> None:
        if vol not in self.model:
            return
        m = self.model[vol]
        name = f"s{next(self.names)}"
        try:
            self.engine.create_snapshot(vol, name)
        except errors.QuotaExceeded:
            assert len(m.snaps) >= 6
            return
        m.snaps[name] = (m.size_blocks, dict(m.blocks))
        m.fresh.clear()

    @rule(vol=volumes, data=st.data())
    def delete_snapshot(self, vol: str, data: st.DataObject) -> None:
        if vol not in self.model or not self.model[vol].snaps:
            return
        m = self.model[vol]
        name = data.draw(st.sampled_from(sorted(m.snaps)))
        self.engine.delete_snapshot(vol, name)
        del m.snaps[name]

    @rule(vol=volumes, data=st.data())
    def rollback(self, vol: str, data: st.DataObject) -> None:
        if vol not in self.model or not self.model[vol].snaps:
            return
        m = self.model[vol]
        name = data.draw(st.sampled_from(sorted(m.snaps)))
        self.engine.rollback(vol, name)
        m.size_blocks, blocks = m.snaps[name]
        m.blocks = dict(blocks)
        m.fresh.clear()

    @rule(target=volumes, vol=volumes, data=st.data())
    def clone(self, vol: str, data: st.DataObject) -> str:
        if vol not in self.model or not self.model[vol].snaps:
            return vol
        m = self.model[vol]
        snap = data.draw(st.sampled_from(sorted(m.snaps)))
        name = f"c{next(self.names)}"
        self.engine.clone(vol, snap, name)
        m.fresh.clear()  # the source's records in the snapshot's view become SHARED
        size, blocks = m.snaps[snap]
        self.model[name] = MVol(size, dict(blocks))
        return name

    @rule(vol=consumes(volumes))
    def delete_volume(self, vol: str) -> None:
        if vol not in self.model:
            return
        self.engine.delete_volume(vol)
        del self.model[vol]
        self.vids.pop(vol, None)

    @rule(vol=volumes, grow=st.integers(1, 8))
    def resize(self, vol: str, grow: int) -> None:
        if vol not in self.model:
            return
        m = self.model[vol]
        self.engine.resize_volume(vol, (m.size_blocks + grow) * BS)
        m.size_blocks += grow

    @rule()
    def flush(self) -> None:
        self.engine.flush()

    @rule()
    def reopen(self) -> None:
        self.engine.close()
        self.engine = Engine.open(self.dir)
        self.engine._c_redirect = self.c_redirect
        native.batch_config(self.engine.native, 0, 64)

    @precondition(lambda self: self.model)
    @rule(vol=volumes)
    def quota_and_bad_input(self, vol: str) -> None:
        if vol not in self.model:
            return
        m = self.model[vol]
        vid = self._vid(vol)
        with pytest.raises(errors.OutOfRange):
            self.engine.write(vid, m.size_blocks * BS - 512, bytes(1024))
        with pytest.raises(errors.AlreadyExists):
            self.engine.create_volume(vol, BS)
        with pytest.raises(errors.InvalidName):
            self.engine.create_snapshot(vol, "bad/name")
        with pytest.raises(errors.SnapshotNotFound):
            self.engine.rollback(vol, "no-such-snapshot")

    # ---- invariants -----------------------------------------------------------------------

    def _hot_path_matches(self) -> None:
        """Through the hot path only (C calls, no Python read transaction, so a pending batch
        stays pending): live reads and block status as the model says."""
        for name, m in self.model.items():
            if name not in self.vids:
                continue
            vid = self.vids[name]
            got = self.engine.read(vid, 0, m.size_blocks * BS)
            assert got == self._bytes(m.blocks, 0, m.size_blocks * BS), f"volume {name} (hot)"
            allocated = [False] * m.size_blocks
            for off, length, alloc in self.engine.block_status(vid, 0, m.size_blocks * BS):
                for b in range(off // BS, (off + length) // BS):
                    allocated[b] = alloc
            assert allocated == [b in m.blocks for b in range(m.size_blocks)], f"{name} status"

    @invariant()
    def reads_match(self) -> None:
        self._hot_path_matches()
        for name, m in self.model.items():
            vid = self._vid(name)
            info = self.engine.volume_info(name)
            assert info.size_bytes == m.size_blocks * BS
            got = self.engine.read(vid, 0, m.size_blocks * BS)
            assert got == self._bytes(m.blocks, 0, m.size_blocks * BS), f"volume {name}"
            for sname, (size, blocks) in m.snaps.items():
                epoch = self.engine.snapshot_id(name, sname)
                got = self.engine.read_snapshot(vid, epoch, 0, size * BS)
                assert got == self._bytes(blocks, 0, size * BS), f"snapshot {name}@{sname}"

    @invariant()
    def capacity_matches(self) -> None:
        views: list[tuple[str, str | None, set[int]]] = []
        for name, m in self.model.items():
            views.append((name, None, set(m.blocks.values())))
            for sname, (_, blocks) in m.snaps.items():
                views.append((name, sname, set(blocks.values())))
        held = set().union(*(v for _, _, v in views)) if views else set()
        usage = self.engine.usage()
        assert usage["store"]["used_bytes"] == len(held) * BS
        for vu in usage["volumes"]:
            name = vu["volume"]
            m = self.model[name]
            assert vu["live_bytes"] == len(m.blocks) * BS
            others_all = set().union(*(v for n, s, v in views if n != name or s is None))
            mine = set().union(*(v for n, s, v in views if n == name and s is not None))
            assert vu["snapshots_bytes"] == len(mine - others_all) * BS, name
            for su in vu["snapshots"]:
                own = set(m.snaps[su["name"]][1].values())
                others = set().union(*(v for n, s, v in views if (n, s) != (name, su["name"])))
                assert su["referenced_bytes"] == len(m.snaps[su["name"]][1]) * BS
                assert su["exclusive_bytes"] == len(own - others) * BS, (name, su["name"])

    @invariant()
    def store_is_consistent(self) -> None:
        report = self.engine.check()
        assert report.ok, report.problems


EXAMPLES = int(os.environ.get("SNAPDISK_MODEL_EXAMPLES", "200"))

class PythonWritePathModel(EngineModel):
    c_redirect = False


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = SETTINGS
TestPythonWritePath = PythonWritePathModel.TestCase
TestPythonWritePath.settings = SETTINGS
