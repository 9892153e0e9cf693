"""The `snapdisk` command, driven as a subprocess against a temporary store: offline (no server:
the CLI opens the store itself) and online (through `snapdisk serve`'s control socket), its
size syntax, its --json output, its error lines and exit codes, and the one-writer rule."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import (  # noqa: F401  (teardown is a fixture)
    Teardown,
    init_store,
    pid_alive,
    run_cli,
    server_pid,
    start_server,
    teardown,
)

from snapdisk import cli, errors

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent


# ---- sizes and rendering (in process) ------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("0", 0), ("1K", 1024), ("512M", 512 * MiB), ("10G", 10 * GiB),
    ("10g", 10 * GiB), ("1.5G", 3 * GiB // 2), ("2T", 2 << 40), ("1P", 1 << 50),
    ("64MiB", 64 * MiB), ("64MB", 64 * MiB), ("8 KiB", 8192), (" 3m ", 3 * MiB), ("100B", 100),
    ("0.5K", 512),
])
def test_parse_size(text: str, value: int) -> None:
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "10X", "-1G", "1.2.3G", "10 G B", "1e3", "0.3K",
                                  "1.0000001K", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(errors.InvalidSize):
        cli.parse_size(text)


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (GiB, "1 GiB"),
    (10 * GiB, "10 GiB"), (3 * GiB // 2, "1.5 GiB"), (1 << 50, "1 PiB"), (None, "-"),
])
def test_format_size(value: int | None, text: str) -> None:
    assert cli.format_size(value) == text


def test_split_ref() -> None:
    assert cli.split_ref("vm@snap-1") == ("vm", "snap-1")
    assert cli.split_ref("vm", need_snapshot=False) == ("vm", None)
    for bad in ("vm", "@s", "vm@", ""):
        with pytest.raises(errors.InvalidArgument):
            cli.split_ref(bad)


def test_exit_codes_follow_errors_and_docs() -> None:
    """The --help epilog is built from errors.py; docs/cli.md must show the same table."""
    text = cli.exit_codes_text()
    for cls in errors.ALL.values():
        assert re.search(rf"^  {cls.exit_code}\s.*\b{re.escape(cls.code)}\b", text, re.M), cls
    doc = (ROOT / "docs" / "cli.md").read_text()
    for line in text.splitlines()[1:]:
        code, names = line.split(None, 1)
        assert re.search(rf"^\| {code} +\| {re.escape(names)} +\|", doc, re.M), line


# ---- help -----------------------------------------------------------------------------------

COMMANDS = ["init", "volume create", "volume list", "volume info", "volume resize",
            "volume delete", "snapshot create", "snapshot list", "snapshot info",
            "snapshot delete", "rollback", "clone", "usage", "check", "serve", "stop", "status",
            "attach", "detach"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    r = run_cli(None, *command.split(), "--help")
    assert "examples:" in r.stdout and "exit codes:" in r.stdout, r.stdout
    assert f"snapdisk {command}" in r.stdout  # the examples use the command itself


def test_no_command_is_a_usage_error() -> None:
    r = run_cli(None, check=False)
    assert r.returncode == 2 and "usage:" in r.stderr


# ---- offline ---------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> str:
    return init_store(str(tmp_path / "store"))


def test_offline_lifecycle(store: str) -> None:
    v = run_cli(store, "--json", "volume", "create", "vm1", "64M").json()
    assert (v["name"], v["size_bytes"], v["live_bytes"]) == ("vm1", 64 * MiB, 0)
    assert "created volume vm2 (1 GiB)" in run_cli(store, "volume", "create", "vm2", "1G").stdout

    vols = run_cli(store, "volume", "list", "--json").json()  # --json after the command too
    assert [x["name"] for x in vols] == ["vm1", "vm2"]
    listing = run_cli(store, "volume", "list").stdout
    assert re.search(r"^vm1 +64 MiB +0 B +0 ", listing, re.M), listing

    assert run_cli(store, "volume", "resize", "vm1", "128M", "--json").json()["size_bytes"] \
        == 128 * MiB
    info = run_cli(store, "volume", "info", "vm1").stdout
    assert re.search(r"^size: +128 MiB \(134217728 bytes\)", info, re.M), info

    s = run_cli(store, "--json", "snapshot", "create", "vm1", "--name", "s1").json()
    assert (s["volume"], s["name"], s["kind"]) == ("vm1", "s1", "manual")
    s2 = run_cli(store, "--json", "snapshot", "create", "vm1").json()
    assert s2["name"] == f"snap-{s2['id']}"
    snaps = run_cli(store, "--json", "snapshot", "list", "vm1").json()
    assert [x["name"] for x in snaps] == ["s1", s2["name"]]
    assert "s1" in run_cli(store, "snapshot", "list", "vm1").stdout
    by_id = run_cli(store, "--json", "snapshot", "info", f"vm1@{s['id']}").json()
    assert by_id["name"] == "s1"
    assert re.search(r"^snapshot: +vm1@s1$", run_cli(store, "snapshot", "info", "vm1@s1").stdout,
                     re.M)

    c = run_cli(store, "--json", "clone", "vm1@s1", "vm1-copy").json()
    assert c["origin"]["snapshot"] == "s1" and c["size_bytes"] == 128 * MiB
    assert "vm1@s1" in run_cli(store, "volume", "info", "vm1-copy").stdout

    r = run_cli(store, "--json", "rollback", "vm1@s1").json()
    assert r["volume"] == "vm1"
    assert "rolled volume vm1 back" in run_cli(store, "rollback", "vm1@s1").stdout

    u = run_cli(store, "--json", "usage").json()
    assert {v["volume"] for v in u["volumes"]} == {"vm1", "vm2", "vm1-copy"}
    assert {"pool_bytes", "used_bytes", "free_bytes", "logical_bytes"} <= set(u["store"])
    assert u["store"]["pool_bytes"] == 2 * GiB
    one = run_cli(store, "--json", "usage", "vm1").json()
    assert [v["volume"] for v in one["volumes"]] == ["vm1"]
    assert all({"exclusive_bytes", "referenced_bytes"} <= set(x)
               for x in one["volumes"][0]["snapshots"])
    text = run_cli(store, "usage").stdout
    assert "EXCLUSIVE" in text and "REFERENCED" in text and "POOL" in text, text

    assert run_cli(store, "--json", "check").json()["ok"] is True
    assert "consistent" in run_cli(store, "check").stdout

    run_cli(store, "snapshot", "delete", "vm1@s1")
    assert [x["name"] for x in run_cli(store, "--json", "snapshot", "list", "vm1").json()] \
        == [s2["name"]]
    run_cli(store, "volume", "delete", "vm2")
    assert "vm2" not in run_cli(store, "volume", "list").stdout
    assert run_cli(store, "--json", "check").json()["ok"] is True


def test_store_from_environment(tmp_path: Path) -> None:
    store = str(tmp_path / "envstore")
    env = {"SNAPDISK_STORE": store}
    run_cli(None, "init", "--pool-size", "1G", env=env)
    run_cli(None, "volume", "create", "e", "1M", env=env)
    assert run_cli(store, "--json", "volume", "list").json()[0]["name"] == "e"
    # --store wins over the environment
    other = str(tmp_path / "other")
    run_cli(other, "init", "--pool-size", "1G", env=env)
    assert run_cli(other, "--json", "volume", "list", env=env).json() == []


def assert_error(r: object, exit_code: int, pattern: str) -> None:
    from e2e_helpers import CLIResult
    assert isinstance(r, CLIResult)
    assert r.returncode == exit_code, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapdisk: error: "), r
    assert re.search(pattern, lines[0]), r
    assert "Traceback" not in r.stderr


def test_errors_and_exit_codes(store: str, tmp_path: Path) -> None:
    run_cli(store, "volume", "create", "vm", "16M")
    run_cli(store, "snapshot", "create", "vm", "--name", "s")
    cases = [
        (["volume", "info", "nope"], errors.VolumeNotFound, "nope"),
        (["snapshot", "info", "vm@nope"], errors.SnapshotNotFound, "nope"),
        (["volume", "create", "vm", "1M"], errors.AlreadyExists, "vm"),
        (["snapshot", "create", "vm", "--name", "s"], errors.AlreadyExists, "s"),
        (["volume", "create", "bad/name", "1M"], errors.InvalidName, "bad/name"),
        (["volume", "create", "odd", "1000"], errors.InvalidSize, "512"),
        (["volume", "resize", "vm", "8M"], errors.InvalidSize, "shrink"),
        (["snapshot", "info", "vm"], errors.InvalidArgument, "VOLUME@SNAPSHOT"),
        (["rollback", "vm@nope"], errors.SnapshotNotFound, "nope"),
        (["clone", "vm@s", "vm"], errors.AlreadyExists, "vm"),
        (["stop"], errors.NotRunning, ""),
    ]
    for args, cls, pattern in cases:
        assert_error(run_cli(store, *args, check=False), cls.exit_code, pattern)
    assert_error(run_cli(str(tmp_path / "missing"), "volume", "list", check=False),
                 errors.StoreNotFound.exit_code, "init")
    assert_error(run_cli(store, "init", check=False), errors.AlreadyExists.exit_code, "exists")
    # argparse's own usage errors: exit 2, like InvalidArgument
    r = run_cli(store, "volume", "create", "x", "10X", check=False)
    assert r.returncode == 2 and "invalid size" in r.stderr, r
    r = run_cli(store, "volume", "frobnicate", check=False)
    assert r.returncode == 2, r


def test_check_reports_problems(store: str) -> None:
    """A damaged store: `check` prints the problems and exits with Corrupt's code."""
    run_cli(store, "volume", "create", "vm", "16M")
    from snapdisk.engine import Engine
    from snapdisk.native import DB_NAMES
    with Engine.open(store) as e, e.native.txn(write=True) as t:
        t.put(DB_NAMES, b"vghost", b"\x00\x00\x00\x63")  # a name pointing at no volume
    r = run_cli(store, "--json", "check", check=False)
    assert r.returncode == errors.Corrupt.exit_code, r
    report = r.json()
    assert report["ok"] is False and report["problems"], report
    r = run_cli(store, "check", check=False)
    assert r.returncode == errors.Corrupt.exit_code
    assert "problem" in r.stdout and r.stderr.startswith("snapdisk: error: "), r


HOLDER = textwrap.dedent("""
    import sys, time
    from snapdisk.engine import Engine
    e = Engine.open(sys.argv[1])
    print("holding", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(store: str) -> Iterator[subprocess.Popen[str]]:
    """Another process with the store open for writing (the one-writer rule's other side)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, store], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "holding"
        yield p
    finally:
        p.kill()
        p.wait()


def test_second_offline_writer_is_refused(store: str, holder: subprocess.Popen[str]) -> None:
    assert_error(run_cli(store, "volume", "list", check=False), errors.StoreLocked.exit_code,
                 "in use")
    assert_error(run_cli(store, "volume", "create", "x", "1M", check=False),
                 errors.StoreLocked.exit_code, "in use")
    assert_error(run_cli(store, "serve", check=False), errors.StoreLocked.exit_code, "in use")


# ---- online ---------------------------------------------------------------------------------

def nbd_handle(store: str, export: str, write: bool = True) -> object:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(os.path.join(store, "nbd.sock"))
    return h


def test_online_lifecycle(store: str, teardown: Teardown) -> None:  # noqa: F811
    pid = start_server(store, teardown)
    st = run_cli(store, "--json", "status").json()
    assert st.get("running") is True and st.get("pid") == pid, st
    assert "running" in run_cli(store, "status").stdout

    run_cli(store, "volume", "create", "vm", "32M")
    h = nbd_handle(store, "vm")
    data = os.urandom(1 << 16)
    h.pwrite(data, 4096)  # type: ignore[attr-defined]
    h.flush()  # type: ignore[attr-defined]
    h.shutdown()  # type: ignore[attr-defined]

    s = run_cli(store, "--json", "snapshot", "create", "vm", "--name", "one").json()
    assert s["referenced_bytes"] >= len(data)
    h = nbd_handle(store, "vm")
    h.pwrite(b"\xff" * len(data), 4096)  # type: ignore[attr-defined]
    h.flush()  # type: ignore[attr-defined]
    h.shutdown()  # type: ignore[attr-defined]

    snap = nbd_handle(store, "vm@one")
    assert snap.pread(len(data), 4096) == data  # type: ignore[attr-defined]
    assert snap.is_read_only()  # type: ignore[attr-defined]
    snap.shutdown()  # type: ignore[attr-defined]

    run_cli(store, "rollback", "vm@one")
    h = nbd_handle(store, "vm")
    assert h.pread(len(data), 4096) == data  # type: ignore[attr-defined]
    h.shutdown()  # type: ignore[attr-defined]

    c = run_cli(store, "--json", "clone", "vm@one", "vm2").json()
    assert c["name"] == "vm2"
    h = nbd_handle(store, "vm2")
    assert h.pread(len(data), 4096) == data  # type: ignore[attr-defined]
    h.shutdown()  # type: ignore[attr-defined]

    u = run_cli(store, "--json", "usage", "vm").json()
    assert u["volumes"][0]["snapshots"][0]["name"] == "one"
    assert run_cli(store, "--json", "check").json()["ok"] is True

    # The server holds the store: a direct (offline) open is refused with a clear error.
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from snapdisk.engine import Engine; Engine.open(sys.argv[1])",
                        store], capture_output=True, text=True)
    assert r.returncode != 0 and "StoreLocked" in r.stderr and "in use" in r.stderr, r.stderr
    # ... and so is a second server.
    assert_error(run_cli(store, "serve", check=False), errors.Busy.exit_code, "")

    assert "stopped" in run_cli(store, "stop").stdout
    assert not pid_alive(pid)
    assert server_pid(store) is None or not pid_alive(server_pid(store) or 0)
    # Offline again: the CLI opens the store itself and sees what the server wrote.
    assert {v["name"] for v in run_cli(store, "--json", "volume", "list").json()} == {"vm", "vm2"}
    st = run_cli(store, "--json", "status", check=False)
    assert st.returncode in (0, errors.NotRunning.exit_code)


def test_online_refusals(store: str, teardown: Teardown) -> None:  # noqa: F811
    """rollback of a volume with clients: refused (Busy) unless --force; volume delete of a
    connected volume: refused."""
    start_server(store, teardown)
    run_cli(store, "volume", "create", "vm", "8M")
    run_cli(store, "snapshot", "create", "vm", "--name", "s")
    h = nbd_handle(store, "vm")
    try:
        assert_error(run_cli(store, "rollback", "vm@s", check=False), errors.Busy.exit_code, "")
        assert_error(run_cli(store, "volume", "delete", "vm", check=False),
                     errors.Busy.exit_code, "")
        r = run_cli(store, "--json", "rollback", "vm@s", "--force").json()
        assert r["disconnected"] >= 1, r
    finally:
        with contextlib.suppress(Exception):  # the forced rollback may have cut it
            h.shutdown()  # type: ignore[attr-defined]
    run_cli(store, "volume", "delete", "vm")


# ---- long operations as jobs: progress and Ctrl-C -------------------------------------------

def test_progress_view_modes() -> None:
    import io
    import json
    ev = [{"event": "job.progress", "job": 1, "done": 0, "total": 0},
          {"event": "job.progress", "job": 1, "done": 3, "total": 4},
          {"event": "job.finished", "job": 1, "ok": True, "result": {}}]
    out = io.StringIO()
    view = cli.ProgressView("json", "roll back", out)
    for e in ev:
        view.event(e)
    view.close()
    assert [json.loads(line) for line in out.getvalue().splitlines()] == ev
    out = io.StringIO()
    view = cli.ProgressView("bar", "roll back web", out)
    for e in ev:
        view.event(e)
    view.note("cancelling")
    view.close()
    assert "roll back web" in out.getvalue() and "3/4" in out.getvalue(), out.getvalue()
    out = io.StringIO()
    view = cli.ProgressView("none", "x", out)
    view.event(ev[1])
    view.close()
    assert out.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert cli.progress_mode(True, Tty()) == "json"
    assert cli.progress_mode(False, Tty()) == "bar"
    assert cli.progress_mode(False, io.StringIO()) == "none"


def test_json_progress_lines_on_stderr(store: str) -> None:
    import json
    run_cli(store, "volume", "create", "vm", "16M")
    run_cli(store, "snapshot", "create", "vm", "--name", "s")
    for args in (["rollback", "vm@s"], ["clone", "vm@s", "c"], ["snapshot", "delete", "vm@s"],
                 ["volume", "delete", "c"]):
        r = run_cli(store, "--json", *args)
        result = r.json()  # stdout: the one result document
        events = [json.loads(line) for line in r.stderr.splitlines()]
        assert events and events[-1]["event"] == "job.finished" and events[-1]["ok"] is True, r
        assert all(e["event"] == "job.progress" for e in events[:-1])
        assert events[-2]["done"] == events[-2]["total"] == 1
        assert result
    r = run_cli(store, "rollback", "vm@s", check=False)  # the snapshot is gone: the job's error
    assert_error(r, errors.SnapshotNotFound.exit_code, "s")


def test_ctrl_c_cancels_the_job(store: str, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while a long operation runs: job.cancel, wait for its end, exit 130, and the
    operation did not happen.  (Offline: the job runs in this process; the engine method is
    made slow and progress-reporting, as the engine's long methods will be.)"""
    import _thread
    import threading
    import time

    from snapdisk.engine import Engine

    run_cli(store, "volume", "create", "vm", "16M")
    run_cli(store, "snapshot", "create", "vm", "--name", "s")
    started = threading.Event()
    real = Engine.rollback
    reports: list[int] = []
    rolled: list[str] = []

    def slow_rollback(self: Engine, volume: str, snap: str | int, progress=None):  # type: ignore[no-untyped-def]
        for i in range(1000):
            progress(i, 1000)
            reports.append(i)
            started.set()
            time.sleep(0.01)
        progress(1000, 1000)
        rolled.append(volume)
        return real(self, volume, snap)

    monkeypatch.setattr(Engine, "rollback", slow_rollback)
    threading.Thread(target=lambda: (started.wait(10), time.sleep(0.1),
                                     _thread.interrupt_main()), daemon=True).start()
    with pytest.raises(SystemExit) as e:
        cli.main(["--store", store, "rollback", "vm@s"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "cancelled" in err and "Traceback" not in err, err
    assert 0 < len(reports) < 1000 and not rolled


def test_ctrl_c_after_the_job_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that completes before the cancel takes effect: still exit 130, saying so."""
    class Job:
        id, op = 1, "rollback"
        cancelled = False

        def events(self) -> Iterator[dict[str, object]]:
            yield {"event": "job.progress", "job": 1, "done": 0, "total": 1}
            raise KeyboardInterrupt

        def cancel(self) -> None:
            self.cancelled = True

        def wait(self, timeout: float | None = None) -> dict[str, object]:
            return {"state": "finished", "ok": True, "result": {}}

    job = Job()

    class Backend:
        def start_job(self, op: str, **args: object) -> Job:
            return job

    ctx = cli.Context("/nonexistent")
    ctx._backend = Backend()
    with pytest.raises(errors.Cancelled, match="already completed"):
        ctx.run_job("roll back", "rollback", volume="v", snapshot="s")
    assert job.cancelled


# ---- issue 10: a damaged store refused by serve; listings past the request-line limit --------

def test_serve_refuses_a_damaged_store(store: str) -> None:
    """A VOLSTATE record of the wrong size: `serve` refuses with exit 10 (corrupt) and says what
    it could not read, as `check` does, and leaves no server behind."""
    from snapdisk import layout
    from snapdisk.engine import Engine
    run_cli(store, "volume", "create", "vm", "16M")
    with Engine.open(store) as e, e.native.txn(write=True) as t:
        t.put(layout.DB_VOLSTATE, layout.vol_key(1), b"\x01" * 37)
    r = run_cli(store, "serve", check=False)
    assert_error(r, errors.Corrupt.exit_code, r"volume 1|VOLSTATE|volume state|bytes")
    assert run_cli(store, "--json", "status").json()["running"] is False


def test_volume_list_with_thousands_of_volumes(store: str) -> None:
    """volume list with 5000 volumes (long names) is a reply of several MiB: the CLI reads it
    through the server's control socket."""
    from snapdisk import catalog
    from snapdisk.control import protocol
    from snapdisk.engine import Engine
    with Engine.open(store) as e, e.native.txn(write=True) as t:
        for i in range(5000):
            catalog.new_volume(t, f"v{i:05d}-{'x' * 60}", 1 << 20, None, {})
    run_cli(store, "serve")
    try:
        r = run_cli(store, "--json", "volume", "list")
        vols = r.json()
        assert len(vols) == 5000
        assert len(protocol.encode({"result": vols})) > protocol.MAX_LINE_BYTES
    finally:
        run_cli(store, "stop", "--force")
