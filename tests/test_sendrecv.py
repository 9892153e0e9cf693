"""send / receive (sendrecv.py) between two stores: round trips compared byte for byte,
refusals, and atomicity (cut and corrupted streams, cancel, kill -9 of the receiver)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import errors, keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

BS = 4096
SIZE = 16 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """No process, mount or loop device still refers to the test's directory afterwards."""
    from e2e_helpers import leftovers
    yield
    assert leftovers(str(tmp_path)) == []


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    a = Engine.create(str(tmp_path / "a"), StoreConfig(pool_bytes=512 << 20))
    b = Engine.create(str(tmp_path / "b"), StoreConfig(pool_bytes=512 << 20))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def scribble(e: Engine, volume: str, rnd: random.Random, n: int = 40) -> None:
    """Random writes (some of zeros), trims and zeroes over the volume."""
    vol = e.volume_id(volume)
    nblocks = e.volume_info(volume).size_bytes // BS
    for _ in range(n):
        blk, ln = rnd.randrange(nblocks), rnd.randint(1, 64)
        ln = min(ln, nblocks - blk)
        op = rnd.random()
        if op < 0.7:
            e.write(vol, blk * BS, rnd.randbytes(ln * BS))
        elif op < 0.8:
            e.write(vol, blk * BS, bytes(ln * BS))
        elif op < 0.9:
            e.trim(vol, blk * BS, ln * BS)
        else:
            e.zero(vol, blk * BS, ln * BS)


def send(e: Engine, ref: str, base: str | None = None) -> tuple[bytes, dict]:
    vol, snap = ref.split("@")
    out = io.BytesIO()
    summary = e.send_stream(vol, snap, out, None if base is None else base.split("@")[1])
    return out.getvalue(), summary


def receive(e: Engine, volume: str, raw: bytes, **kw: object) -> dict:
    return e.receive_stream(volume, io.BytesIO(raw), **kw)  # type: ignore[arg-type]


def same_snapshot(a: Engine, av: str, b: Engine, bv: str, snap: str) -> None:
    ea, eb = a.snapshot_id(av, snap), b.snapshot_id(bv, snap)
    va, vb = a.volume_id(av), b.volume_id(bv)
    size = a.snapshot_size(va, ea)
    assert b.snapshot_size(vb, eb) == size
    for off in range(0, size, 4 << 20):
        n = min(4 << 20, size - off)
        assert a.read_snapshot(va, ea, off, n) == b.read_snapshot(vb, eb, off, n), (snap, off)


def state(e: Engine) -> tuple[object, ...]:
    """What a failed receive must leave unchanged: volumes, snapshots, live bytes; check ok."""
    report = e.check()
    assert report.ok, report
    vols = [(v.name, v.size_bytes, v.extra) for v in e.list_volumes()]
    snaps = {v: [(s.id, s.name) for s in e.list_snapshots(v, with_usage=False)]
             for v, _, _ in vols}
    data = {v: e.read(e.volume_id(v), 0, size) for v, size, _ in vols}
    return vols, snaps, data


def chain(a: Engine, rnd: random.Random, n: int = 4) -> list[str]:
    a.create_volume("v", SIZE)
    names = []
    for i in range(n):
        scribble(a, "v", rnd)
        names.append(f"s{i}")
        a.create_snapshot("v", names[-1])
    return names


def test_full_then_chain_of_incrementals(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    names = chain(a, random.Random(1), 5)
    raw, s = send(a, "v@s0")
    assert not s["incremental"] and s["trim_bytes"] == 0
    r = receive(b, "w", raw)
    assert r["snapshot"]["guid"] == s["snapshot"]["guid"]
    for prev, cur in zip(names, names[1:], strict=False):
        raw, s = send(a, f"v@{cur}", base=f"v@{prev}")
        changed = sum(c.length for c in a.diff("v", prev, cur))
        # only the changed ranges are in the stream, each once
        assert s["data_bytes"] + s["zero_bytes"] + s["trim_bytes"] == changed
        receive(b, "w", raw)
    for n in names:
        same_snapshot(a, "v", b, "w", n)
    assert b.read(b.volume_id("w"), 0, SIZE) == \
        a.read_snapshot(a.volume_id("v"), a.snapshot_id("v", names[-1]), 0, SIZE)
    assert b.check().ok and a.check().ok
    assert [x.name for x in b.list_snapshots("w")] == names
    # chained: the receiver sends on, keeping the identities
    raw, s2 = send(b, f"w@{names[-1]}", base=f"w@{names[-2]}")
    assert s2["base"]["guid"] == s["base"]["guid"] and s2["snapshot"]["guid"] == \
        s["snapshot"]["guid"]


def test_clone_snapshot_full(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    rnd = random.Random(2)
    chain(a, rnd, 2)
    a.clone("v", "s0", "c")
    scribble(a, "c", rnd)
    a.create_snapshot("c", "cs")
    receive(b, "c2", send(a, "c@cs")[0])
    same_snapshot(a, "c", b, "c2", "cs")


def test_wrong_base_is_refused_naming_both(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    chain(a, random.Random(3), 3)
    receive(b, "w", send(a, "v@s0")[0])
    before = state(b)
    raw = send(a, "v@s2", base="v@s1")[0]
    with pytest.raises(errors.InvalidArgument) as e:
        receive(b, "w", raw)
    assert "v@s1" in e.value.message and "w@s0" in e.value.message, e.value.message
    assert state(b) == before
    with pytest.raises(errors.VolumeNotFound):
        receive(b, "nothere", raw)
    with pytest.raises(errors.AlreadyExists):
        receive(b, "w", send(a, "v@s0")[0])  # a full stream onto an existing volume
    assert state(b) == before


def test_written_after_newest_snapshot_refused_unless_force(
        stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    chain(a, random.Random(4), 2)
    receive(b, "w", send(a, "v@s0")[0])
    b.write(b.volume_id("w"), 0, b"x" * BS)
    before = state(b)
    raw = send(a, "v@s1", base="v@s0")[0]
    with pytest.raises(errors.InvalidArgument, match="written after its newest snapshot"):
        receive(b, "w", raw)
    assert state(b) == before
    receive(b, "w", raw, force=True)
    same_snapshot(a, "v", b, "w", "s1")


def test_encrypted_volume_is_refused(stores: tuple[Engine, Engine]) -> None:
    """A legacy (pbn-tweak) encrypted volume; new ones are sent raw (test_raw_encrypted.py)."""
    from crypto_helpers import make_legacy
    a, _ = stores
    a.create_volume("sec", SIZE, encrypt=keys.Secret(passphrase=b"open sesame"))
    make_legacy(a, "sec", keys.Secret(passphrase=b"open sesame"))
    a.create_snapshot("sec", "s")
    with pytest.raises(errors.Unsupported) as e:
        send(a, "sec@s")
    assert "physical block number" in e.value.message and "--decrypt" in e.value.message


def test_growing_volume(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    chain(a, random.Random(5), 1)
    receive(b, "w", send(a, "v@s0")[0])
    a.resize_volume("v", SIZE * 2)
    a.write(a.volume_id("v"), SIZE + BS, b"y" * BS)
    a.create_snapshot("v", "big")
    receive(b, "w", send(a, "v@big", base="v@s0")[0])
    same_snapshot(a, "v", b, "w", "big")


@pytest.mark.parametrize("incremental", [False, True])
def test_cut_and_flipped_streams_leave_nothing(stores: tuple[Engine, Engine],
                                               incremental: bool) -> None:
    a, b = stores
    chain(a, random.Random(6), 2)
    if incremental:
        receive(b, "w", send(a, "v@s0")[0])
        raw = send(a, "v@s1", base="v@s0")[0]
    else:
        raw = send(a, "v@s1")[0]
    before = state(b)
    rnd = random.Random(7)
    meta_end = raw.index(b"SDSTREAM") + 32 + int.from_bytes(raw[24:28], "little") + 32
    cuts = {0, 5, 31, 40, meta_end - 1, meta_end, meta_end + 30, len(raw) - 1, len(raw) - 8,
            len(raw) - 50, len(raw) - 100}
    while len(cuts) < 25:
        cuts.add(rnd.randrange(len(raw)))
    for cut in sorted(cuts):
        with pytest.raises(errors.FormatError):
            receive(b, "w", raw[:cut])
    assert state(b) == before
    for _ in range(20):
        bad = bytearray(raw)
        bad[rnd.randrange(len(raw))] ^= 1 << rnd.randrange(8)
        with pytest.raises(errors.FormatError):
            receive(b, "w", bytes(bad))
    assert state(b) == before
    receive(b, "w", raw)  # the whole stream still applies
    same_snapshot(a, "v", b, "w", "s1")


def test_cancel_undoes(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    a.create_volume("v", SIZE)
    a.write(a.volume_id("v"), 0, random.Random(8).randbytes(12 << 20))
    a.create_snapshot("v", "s0")
    raw = send(a, "v@s0")[0]
    before = state(b)
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if 0 < done < total:  # midway (progress comes every few MiB)
            raise errors.Cancelled("cancelled")

    with pytest.raises(errors.Cancelled):
        b.receive_stream("w", io.BytesIO(raw), progress=progress)
    assert state(b) == before
    assert len(calls) == 2 and 0 < calls[1] < len(raw)


# ---- kill -9 of a receiving process -----------------------------------------------------------

@pytest.mark.parametrize("incremental", [False, True])
def test_kill9_mid_receive_leaves_nothing(tmp_path: Path, incremental: bool,
                                          no_leftovers: None) -> None:
    a = Engine.create(str(tmp_path / "a"), StoreConfig(pool_bytes=512 << 20))
    b_path = str(tmp_path / "b")
    with a, Engine.create(b_path, StoreConfig(pool_bytes=512 << 20)) as b:
        a.create_volume("v", 64 << 20)
        a.write(a.volume_id("v"), 0, random.Random(9).randbytes(8 << 20))
        a.create_snapshot("v", "s0")
        a.write(a.volume_id("v"), 0, random.Random(10).randbytes(48 << 20))
        a.create_snapshot("v", "s1")
        if incremental:
            receive(b, "w", send(a, "v@s0")[0])
            raw = send(a, "v@s1", base="v@s0")[0]
        else:
            raw = send(a, "v@s1")[0]
        before = state(b)
    proc = subprocess.Popen([sys.executable, "-m", "snapdisk.cli", "--store", b_path,
                             "receive", "w"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(raw[:len(raw) // 2])  # returns once the receiver has read most of it
        proc.stdin.flush()
        time.sleep(1.0)
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with Engine.open(b_path) as b:  # open undoes the interrupted receive
        assert state(b) == before
        assert not [v for v in b.list_volumes() if v.name.startswith("receiving-")]
        receive(b, "w", raw)
        assert b.check().ok


# ---- through the CLI, offline and through servers (real pipes, real NBD clients) --------------

CLI = f"{sys.executable} -m snapdisk.cli"


def sh(cmd: str, tmp: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A shell pipeline; TMPDIR private, so that the descriptor sockets left behind show."""
    env = {**os.environ, "TMPDIR": str(tmp / "tmp")}
    (tmp / "tmp").mkdir(exist_ok=True)
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL, timeout=300)
    if check:
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r


def make_source(path: Path, rnd: random.Random) -> str:
    with Engine.create(str(path), StoreConfig(pool_bytes=512 << 20)) as e:
        e.create_volume("v", SIZE)
        scribble(e, "v", rnd)
        e.create_snapshot("v", "s0")
    return str(path)


def test_cli_pipe_offline(tmp_path: Path, no_leftovers: None) -> None:
    a = make_source(tmp_path / "a", random.Random(11))
    b = str(tmp_path / "b")
    Engine.create(b, StoreConfig(pool_bytes=512 << 20)).close()
    sh(f"{CLI} --store {a} send v@s0 | {CLI} --store {b} receive w", tmp_path)
    with Engine.open(a) as e:
        scribble(e, "v", random.Random(12))
        e.create_snapshot("v", "s1")
    f = tmp_path / "inc.sdstream"
    r = sh(f"{CLI} --store {a} --json send v@s1 --from v@s0 -o {f}", tmp_path)
    sent = json.loads(r.stdout)
    assert sent["incremental"] and sent["stream_bytes"] == f.stat().st_size
    r = sh(f"{CLI} --store {b} --json receive w -i {f}", tmp_path)
    assert json.loads(r.stdout)["snapshot"]["guid"] == sent["snapshot"]["guid"]
    r = sh(f"{CLI} --store {a} --json send v@s1 | cat", tmp_path, check=False)
    assert r.returncode == 2 and "-o FILE" in r.stderr
    full = tmp_path / "full.sdstream"
    sh(f"{CLI} --store {a} send v@s1 -o {full}", tmp_path)
    r = sh(f"head -c 100000 {full} | {CLI} --store {b} receive w9", tmp_path, check=False)
    assert r.returncode == errors.FormatError.exit_code and "cut or truncated" in r.stderr
    with Engine.open(a) as ea, Engine.open(b) as eb:
        for s in ("s0", "s1"):
            same_snapshot(ea, "v", eb, "w", s)
        assert eb.check().ok
    assert os.listdir(tmp_path / "tmp") == []


def qemu_compare(x: str, y: str) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", x, y],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (x, y, r.stdout, r.stderr)


def test_through_servers_qemu_img_compare(tmp_path: Path, no_leftovers: None,  # type: ignore[no-untyped-def]
                                          served) -> None:
    """Both stores served: the CLI pipes go through both control sockets (descriptors passed
    to the servers), the snapshots compared over NBD with qemu-img; then the ops with a path."""
    import nbd
    sa = served(make_source(tmp_path / "a", random.Random(13)))
    b = str(tmp_path / "b")
    Engine.create(b, StoreConfig(pool_bytes=512 << 20)).close()
    sb = served(b)
    sh(f"{CLI} --store {sa.store} send v@s0 | {CLI} --store {sb.store} receive w", tmp_path)
    rnd = random.Random(14)
    for i in (1, 2, 3):
        h = sa.connect("v")
        for _ in range(30):
            h.pwrite(rnd.randbytes(BS * rnd.randint(1, 16)), rnd.randrange(SIZE // BS - 16) * BS)
        h.trim(BS * 64, BS * rnd.randrange(64))
        h.shutdown()
        sa.call("snapshot.create", volume="v", name=f"s{i}")
        sh(f"{CLI} --store {sa.store} send v@s{i} --from v@s{i - 1} | "
           f"{CLI} --store {sb.store} receive w", tmp_path)
    # the jobs ran in the servers
    assert {j["op"] for j in sa.call("job.list")} == {"send"}  # type: ignore[union-attr]
    assert {j["op"] for j in sb.call("job.list")} == {"receive"}  # type: ignore[union-attr]
    for i in range(4):
        qemu_compare(sa.uri(f"v@s{i}"), sb.uri(f"w@s{i}"))
    qemu_compare(sa.uri("v@s3"), sb.uri("w"))
    # a live NBD client of the target: the receive is refused (Busy), then forced
    h = sb.connect("w")
    f = tmp_path / "s4.sdstream"
    sa.call("snapshot.create", volume="v", name="s4")
    sa.call("send", volume="v", snapshot="s4", base="s3", path=str(f))
    with pytest.raises(errors.Busy, match="connected"):
        sb.call("receive", volume="w", path=str(f))
    assert [s["name"] for s in sb.call("snapshot.list", volume="w")][-1] == "s3"  # type: ignore[index]
    sb.call("receive", volume="w", path=str(f), force=True)
    with pytest.raises(nbd.Error):
        h.pread(BS, 0)  # cut off
    qemu_compare(sa.uri("v@s4"), sb.uri("w@s4"))
    # a cut stream through the server leaves nothing, and the server lives on
    r = sh(f"{CLI} --store {sa.store} send v@s0 | head -c 5000 | "
           f"{CLI} --store {sb.store} receive w2", tmp_path, check=False)
    assert r.returncode == errors.FormatError.exit_code, r.stderr
    assert [v["name"] for v in sb.call("volume.list")] == ["w"]  # type: ignore[union-attr]
    assert sb.call("check")["ok"]  # type: ignore[index]
    assert sb.call("check")["ok"]  # type: ignore[index]
    # one store, one server: send | receive within it
    sh(f"{CLI} --store {sb.store} send w@s4 | {CLI} --store {sb.store} receive w3", tmp_path)
    qemu_compare(sb.uri("w@s4"), sb.uri("w3@s4"))
    # a reader that goes away: send fails, the server lives on
    r = sh(f"{CLI} --store {sa.store} send v@s4 | head -c 100 >/dev/null", tmp_path,
           check=False)
    assert r.returncode != 0
    assert sa.call("status")["running"]  # type: ignore[index]
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("incremental", [False, True])
def test_kill9_of_the_receiving_server(tmp_path: Path, no_leftovers: None,  # type: ignore[no-untyped-def]
                                       served, incremental: bool) -> None:
    """The server dies mid-receive (kill -9); restarted, it has undone the receive before
    serving anything: nothing half-made is listed, check is clean."""
    a = make_source(tmp_path / "a", random.Random(15))
    with Engine.open(a) as e:
        e.write(e.volume_id("v"), 0, random.Random(16).randbytes(SIZE))
        e.create_snapshot("v", "s1")
        full, inc = send(e, "v@s0")[0], send(e, "v@s1", base="v@s0")[0]
    b = str(tmp_path / "b")
    with Engine.create(b, StoreConfig(pool_bytes=512 << 20)) as e:
        if incremental:
            receive(e, "w", full)
        before = state(e)
    raw = inc if incremental else send_big(tmp_path)
    sb = served(b)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "snapdisk.cli", "--store", b, "receive", "w"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdin is not None
        proc.stdin.write(raw[:len(raw) // 2])
        proc.stdin.flush()
        time.sleep(1.0)
        os.kill(sb.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    wait_gone(sb.pid)
    sb2 = served(b)
    names = [v["name"] for v in sb2.call("volume.list")]  # type: ignore[union-attr]
    assert names == (["w"] if incremental else []), names
    assert sb2.call("check")["ok"]  # type: ignore[index]
    sb2.call("stop")
    wait_gone(sb2.pid)
    with Engine.open(b) as e:
        assert state(e) == before


def wait_gone(pid: int) -> None:
    from snapdisk import daemon
    deadline = time.monotonic() + 15
    while daemon._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon._alive(pid)


def send_big(tmp_path: Path) -> bytes:
    """A full stream large enough to be cut midway (32 MiB of data)."""
    with Engine.create(str(tmp_path / "big"), StoreConfig(pool_bytes=256 << 20)) as e:
        e.create_volume("v", 32 << 20)
        e.write(e.volume_id("v"), 0, random.Random(17).randbytes(32 << 20))
        e.create_snapshot("v", "s0")
        return send(e, "v@s0")[0]


def test_guid_is_an_optional_key_of_the_snapshot_record() -> None:
    """Old records have no guid (and still decode); a received one keeps the sender's."""
    from snapdisk.catalog import SnapshotRecord
    old = b'{"created":1.0,"kind":"manual","name":"s","policy":null,"referenced_blocks":0,' \
          b'"size_bytes":4096}'
    rec = SnapshotRecord.decode(old, 1, 2)
    assert rec.guid is None and b"guid" not in rec.encode()
    rec.guid = "abc"
    assert SnapshotRecord.decode(rec.encode(), 1, 2).guid == "abc"


def test_received_snapshot_keeps_the_guid_across_reopen(tmp_path: Path) -> None:
    a = make_source(tmp_path / "a", random.Random(18))
    with Engine.open(a) as e:
        raw, s = send(e, "v@s0")
    with Engine.create(str(tmp_path / "b"), StoreConfig(pool_bytes=256 << 20)) as e:
        receive(e, "w", raw)
    with Engine.open(str(tmp_path / "b")) as e:
        assert send(e, "w@s0")[1]["snapshot"]["guid"] == s["snapshot"]["guid"]


def test_received_snapshot_keeps_the_senders_creation_time(tmp_path: Path) -> None:
    a = Engine.create(str(tmp_path / "a"), StoreConfig(pool_bytes=64 << 20))
    b = Engine.create(str(tmp_path / "b"), StoreConfig(pool_bytes=64 << 20))
    try:
        a.create_volume("v", 1 << 20)
        a.write(a.volume_id("v"), 0, b"x" * 4096)
        taken = a.create_snapshot("v", "s1").created
        buf = io.BytesIO()
        a.send_stream("v", "s1", buf)
        time.sleep(0.05)
        buf.seek(0)
        b.receive_stream("v", buf)
        assert b.snapshot_info("v", "s1").created == taken
    finally:
        a.close()
        b.close()
