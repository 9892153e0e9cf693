"""`snapdisk export` / `snapdisk import` (issue 13, imagecopy.py): raw and qcow2 images out of a
snapshot and into a new volume, compared with `qemu-img compare` against the exports; holes
stay holes; bad images are clear errors that leave no volume; failures and cancels leave no
half volume and no half file; with a server and offline (a temporary server, stopped by pid)."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Served, make_store
from e2e_helpers import run_cli, server_pid

from snapdisk import errors, imagecopy, keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

pytestmark = pytest.mark.skipif(subprocess.run(["which", "qemu-img"], capture_output=True)
                                .returncode != 0, reason="needs qemu-img")
BS, MiB = 4096, 1 << 20
SIZE = 16 * MiB
# Data runs (one only 512-aligned: the exports' minimum block size); the rest holes.
RUNS = [(0, 3 * BS), (MiB + 512, 5120), (5 * MiB, MiB), (SIZE - BS, BS)]


def touched() -> int:
    """The bytes of the 4 KiB blocks RUNS touch."""
    return len({b for off, n in RUNS for b in range(off // BS, (off + n - 1) // BS + 1)}) * BS


def fill(h: object, seed: int = 1) -> int:
    """Random data at RUNS (one unaligned); the bytes of the 4 KiB blocks they touch."""
    rnd = random.Random(seed)
    for off, n in RUNS:
        h.pwrite(rnd.randbytes(n), off)  # type: ignore[attr-defined]
    h.flush()  # type: ignore[attr-defined]
    return touched()


def compare(a: str, b: str, fa: str = "raw", fb: str = "raw") -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, a, b], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (a, b, r.stdout, r.stderr)


def allocated(h: object, size: int) -> int:
    """Bytes the export reports as data (NBD block status, base:allocation)."""
    import nbd
    total, off = 0, 0
    while off < size:
        got: list[tuple[int, int]] = []

        def cb(meta: str, o: int, entries: list[int], err: object,
               got: list[tuple[int, int]] = got) -> int:
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        h.block_status(min(size - off, 64 * MiB), off, cb)  # type: ignore[attr-defined]
        assert got
        for n, flags in got:
            total += 0 if flags & nbd.STATE_HOLE else min(n, size - off)
            off += n
    return total


def image(tmp_path: Path, data_bytes: dict[int, bytes], name: str = "in.raw") -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(SIZE - 1000)  # not a multiple of 4 KiB: the volume is rounded up
        for off, b in data_bytes.items():
            f.seek(off)
            f.write(b)
    return p


# ---- with a server ----------------------------------------------------------------------------

def test_export_raw_and_qcow2_with_a_server(tmp_path: Path,
                                            served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": SIZE})
    s = served(store)
    h = s.connect("v")
    data = fill(h)
    s.call("snapshot.create", volume="v", name="s1")
    h.pwrite(b"after" * 1024, 0)  # after the snapshot: not in the export
    h.shutdown()
    raw, qcow = tmp_path / "v.raw", tmp_path / "v.qcow2"
    r = run_cli(store, "--json", "export", "v@s1", str(raw)).json()
    assert r["format"] == "raw" and r["virtual_size"] == SIZE and raw.stat().st_size == SIZE
    assert r["allocated_bytes"] <= data + 64 * 1024  # holes stay holes: a sparse file
    run_cli(store, "export", "v@s1", str(qcow), "--format", "qcow2")
    assert qcow.stat().st_size < 4 * MiB
    compare(str(raw), s.uri("v@s1"))
    compare(str(qcow), s.uri("v@s1"), fa="qcow2")
    with pytest.raises(AssertionError):  # the comparison can fail: the live volume differs
        compare(str(raw), s.uri("v"))
    r2 = run_cli(store, "export", "v@s1", str(raw), check=False)
    assert r2.returncode == errors.AlreadyExists.exit_code and "--force" in r2.stderr
    run_cli(store, "export", "v@s1", str(raw), "--force", "--format", "qcow2")
    assert subprocess.run(["qemu-img", "info", str(raw)], capture_output=True,
                          text=True).stdout.count("qcow2")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".snapdisk-part")]

    # import a qcow2 and a raw image into new volumes of the running server
    r = run_cli(store, "--json", "import", str(qcow), "from-qcow").json()
    assert r["format"] == "qcow2" and r["size_bytes"] == SIZE
    assert r["live_bytes"] == data  # every hole stayed a hole
    rawin = tmp_path / "v2.raw"
    run_cli(store, "export", "v@s1", str(rawin))
    r = run_cli(store, "--json", "import", str(rawin), "from-raw", "--format", "raw").json()
    assert r["format"] == "raw" and r["live_bytes"] == data
    for vol in ("from-qcow", "from-raw"):
        compare(s.uri(vol), s.uri("v@s1"))
        h = s.connect(vol)
        assert allocated(h, SIZE) == data  # block status: the holes are holes
        h.shutdown()
    assert s.call("job.list")  # they ran as jobs of the server


def test_import_rounds_the_size_up_and_refuses_bad_images(tmp_path: Path,
                                                          served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store")
    s = served(store)
    rnd = random.Random(3)
    src = image(tmp_path, {0: rnd.randbytes(BS), 7 * MiB + 4000: rnd.randbytes(777)})
    r = run_cli(store, "--json", "import", str(src), "odd").json()
    assert r["size_bytes"] == -(-(SIZE - 1000) // BS) * BS and r["live_bytes"] == 3 * BS
    compare(str(src), s.uri("odd"))  # compare allows the larger image's tail of zeros
    good = tmp_path / "good.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(good)], check=True)
    bad = {
        "cut.qcow2": good.read_bytes()[:100_000],
        "garbage.qcow2": b"QFI\xfb" + b"\xff" * 600,
        "empty.img": b"",
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(good),
                    str(tmp_path / "overlay.qcow2")], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-f", "vmdk", str(tmp_path / "x.vmdk"), "1M"],
                   check=True, capture_output=True)
    before = s.call("volume.list")
    for name, code in [("cut.qcow2", errors.InvalidArgument), ("garbage.qcow2",
                       errors.InvalidArgument), ("empty.img", errors.InvalidArgument),
                       ("overlay.qcow2", errors.Unsupported), ("x.vmdk", errors.Unsupported),
                       ("missing.img", errors.NotFound)]:
        r2 = run_cli(store, "import", str(tmp_path / name), "nope", check=False)
        assert r2.returncode == code.exit_code, (name, r2)
        assert name in r2.stderr and r2.stderr.count("\n") == 1, r2.stderr  # one clear line
    r2 = run_cli(store, "import", str(good), "odd", check=False)  # the name is taken
    assert r2.returncode == errors.AlreadyExists.exit_code
    assert s.call("volume.list") == before  # no volume left behind, "odd" untouched
    with pytest.raises(errors.InvalidArgument):  # the op itself refuses a relative path
        s.call("image.import", file="good.qcow2", name="rel")


def test_a_failed_import_deletes_the_half_made_volume(tmp_path: Path,
                                                      served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", pool_bytes=32 * MiB)
    s = served(store)
    big = tmp_path / "big.raw"
    big.write_bytes(random.Random(4).randbytes(48 * MiB))  # more than the pool holds
    r = run_cli(store, "import", str(big), "big", check=False)
    assert r.returncode == errors.ServerError.exit_code and "qemu-img" in r.stderr, r
    assert s.call("volume.list") == []
    usage = s.call("usage")
    assert isinstance(usage, dict)
    assert usage["store"]["used_bytes"] == 0  # its blocks were freed with it


def test_cancel_import_and_export_leave_nothing(tmp_path: Path,
                                                served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": 64 * MiB})
    s = served(store)
    h = s.connect("v")
    for i in range(64):
        h.pwrite(random.Random(i).randbytes(MiB), i * MiB)
    h.flush()
    h.shutdown()
    s.call("snapshot.create", volume="v", name="s")
    img = tmp_path / "v.raw"
    run_cli(store, "export", "v@s", str(img))
    for op, args in [("image.import", {"file": str(img), "name": "w"}),
                     ("image.export", {"volume": "v", "snapshot": "s",
                                       "file": str(tmp_path / "out.qcow2"), "format": "qcow2"})]:
        with s.client(timeout=120) as c:
            job = c.start_job(op, **args)
            for event in job.events():  # cancelled once qemu-img runs (the volume, the part
                if event.get("total"):  # file exist by then)
                    job.cancel()
            final = job.wait()
        assert not final.get("ok") and final["error"]["code"] == "cancelled", final
    assert [v["name"] for v in s.call("volume.list")] == ["v"]  # type: ignore[union-attr]
    assert sorted(os.listdir(tmp_path)) == ["store", "v.raw"]


# ---- offline: a temporary server --------------------------------------------------------------

def test_offline_export_and_import_use_a_temporary_server(
        tmp_path: Path, served: Callable[..., Served], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")  # the temporary servers inherit it
    store = str(tmp_path / "store")
    pw = tmp_path / "pw"
    pw.write_text("open sesame\n")
    rnd = random.Random(9)
    payload = {off: rnd.randbytes(n) for off, n in RUNS}
    with Engine.create(store, StoreConfig(pool_bytes=256 * MiB)) as e:
        for name, secret in (("v", None), ("sec", keys.Secret(passphrase=b"open sesame"))):
            e.create_volume(name, SIZE, encrypt=secret)
            vol = e.volume_id(name)
            for off, b in payload.items():
                e.write(vol, off, b)
            e.create_snapshot(name, "s1")
    expected = image(tmp_path, payload, "expected.raw")
    os.truncate(expected, SIZE)
    out, qc = tmp_path / "out.raw", tmp_path / "out.qcow2"
    run_cli(store, "export", "v@s1", str(out))
    assert server_pid(store) is None and not (Path(store) / "control.sock").exists()
    run_cli(store, "export", "v@s1", str(qc), "--format", "qcow2")
    r = run_cli(store, "export", "sec@s1", str(tmp_path / "sec.raw"), check=False)
    assert r.returncode == errors.BadKey.exit_code and "unlock" in r.stderr, r  # locked
    assert not (tmp_path / "sec.raw").exists()
    run_cli(store, "export", "sec@s1", str(tmp_path / "sec.raw"), "--passphrase-file", str(pw))
    for f, fmt in ((out, "raw"), (qc, "qcow2"), (tmp_path / "sec.raw", "raw")):
        compare(str(f), str(expected), fa=fmt)
    r = run_cli(store, "--json", "import", str(qc), "back").json()
    assert r["live_bytes"] == touched()  # holes stay holes
    r = run_cli(store, "--json", "import", str(out), "enc", "--encrypt", "--passphrase-file",
                str(pw)).json()
    assert r["encrypted"] is True
    bad = tmp_path / "cut.qcow2"
    bad.write_bytes(qc.read_bytes()[:70_000])
    r2 = run_cli(store, "import", str(bad), "cut", check=False)
    assert r2.returncode == errors.InvalidArgument.exit_code and "damaged" in r2.stderr
    assert server_pid(store) is None  # every temporary server stopped, also after the failure
    s = served(store)
    names = {v["name"]: v for v in s.call("volume.list")}  # type: ignore[union-attr]
    assert set(names) == {"v", "sec", "back", "enc"} and names["enc"]["locked"]
    s.call("key.unlock", volume="enc", passphrase="open sesame")
    for vol in ("back", "enc"):
        compare(s.uri(vol), str(expected))
        h = s.connect(vol)
        assert allocated(h, SIZE) == touched() == names["v"]["live_bytes"]  # holes: holes
        h.shutdown()


def test_probe_known_answers(tmp_path: Path) -> None:
    p = image(tmp_path, {0: b"x" * 10})
    info = imagecopy.probe(str(p))
    # qemu-img reports a raw file's size rounded up to 512-byte sectors
    assert (info.format, info.virtual_size) == ("raw", -(-(SIZE - 1000) // 512) * 512)
    with pytest.raises(errors.InvalidArgument):
        imagecopy.probe(str(p), "vmdk")
    q = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(p), str(q)], check=True)
    assert imagecopy.probe(str(q)).format == "qcow2"
    assert imagecopy.probe(str(q), "raw").format == "raw"  # as told: its bytes as a raw disk


def test_ctrl_c_offline_cancels_and_stops_the_temporary_server(tmp_path: Path) -> None:
    import signal
    import sys
    import time
    store = make_store(tmp_path / "store", pool_bytes=512 * MiB)
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    proc = subprocess.Popen([sys.executable, "-m", "snapdisk.cli", "--store", store, "--json",
                             "import", str(img), "w"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # JSON progress lines: interrupt once qemu-img runs
            pid = pid or server_pid(store)
            if '"total": 0' not in line and "job.progress" in line:
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert pid is not None
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") and server_pid(store) is None
    with Engine.open(store) as e:
        assert e.list_volumes() == []  # the half-made volume was deleted
