"""The control socket (protocol, every op, bad requests, permissions), the rules it enforces for
connected NBD clients (rollback, delete), serve/stop/status, and the local backend."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import Served, make_store
from waiting import wait_until

from snapdisk import daemon as srv
from snapdisk import errors
from snapdisk.control import ops, protocol
from snapdisk.control.backend import LocalBackend, open_backend
from snapdisk.control.client import Client

MiB = 1 << 20
BS = 4096


class Raw:
    """A control connection speaking bytes, for the tests of malformed input."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = protocol.LineReader(self.sock, limit=1 << 24)
        self.greeting = self.read()

    def read(self) -> Any:
        line = self.reader.readline()
        return None if line is None else json.loads(line)

    def send(self, data: bytes) -> Any:
        self.sock.sendall(data)
        return self.read()

    def ask(self, msg: Any) -> Any:
        return self.send(json.dumps(msg).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def test_greeting(server: Served) -> None:
    raw = Raw(server.control_socket)
    g = raw.greeting["snapdisk"]
    assert g["version"] == "0.1.0" and g["protocol"] == protocol.PROTOCOL_VERSION == 1
    assert set(g["capabilities"]) == set(ops.OPS) and "stop" in g["capabilities"]
    with server.client() as c:
        assert c.protocol == 1 and c.capabilities == g["capabilities"]
    raw.close()


def test_socket_is_owner_only(server: Served) -> None:
    st = os.stat(server.control_socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.stat(server.store).st_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_peer_credentials_are_checked(server: Served) -> None:
    # A client whose effective uid is nobody's, but whose filesystem uid stays root (so the
    # socket's 0600 lets it connect): only the SO_PEERCRED check stands in its way.
    code = ("import ctypes, os, socket, sys\n"
            "os.setresgid(65534, 65534, 0); os.setresuid(65534, 65534, 0)\n"
            "assert ctypes.CDLL(None).setfsuid(0) == 65534\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(10)\n"
            "s.connect(sys.argv[1]); sys.stdout.write(s.recv(4096).decode())\n")
    out = subprocess.run(["/usr/bin/python3", "-c", code, server.control_socket],
                         capture_output=True, text=True, timeout=30)
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and "permission denied" in reply["error"]["message"]
    with server.client() as c:  # root still gets in
        assert c.call("status")["running"]


def test_every_op(server: Served) -> None:
    with server.client() as c:
        v = c.call("volume.create", name="vm1", size_bytes=16 * MiB)
        assert v["name"] == "vm1" and v["size_bytes"] == 16 * MiB and v["connections"] == 0
        assert [x["name"] for x in c.call("volume.list")] == ["vm1"]
        assert c.call("volume.info", name="vm1")["id"] == v["id"]
        h = server.connect("vm1")
        h.pwrite(b"A" * MiB, 0)
        assert c.call("volume.info", name="vm1")["connections"] == 1
        s1 = c.call("snapshot.create", volume="vm1", name="s1")
        assert s1["name"] == "s1" and s1["kind"] == "manual" and s1["referenced_bytes"] == MiB
        s2 = c.call("snapshot.create", volume="vm1", kind="auto", policy="hourly")
        assert s2["kind"] == "auto" and s2["policy"] == "hourly"
        assert [s["name"] for s in c.call("snapshot.list", volume="vm1")] == ["s1", s2["name"]]
        assert c.call("snapshot.info", volume="vm1", snapshot="s1")["id"] == s1["id"]
        assert c.call("snapshot.info", volume="vm1", snapshot=s1["id"])["name"] == "s1"
        assert c.call("volume.resize", name="vm1", size_bytes=32 * MiB)["size_bytes"] == 32 * MiB
        cl = c.call("clone", volume="vm1", snapshot="s1", name="copy")
        assert cl["origin"]["snapshot"] == "s1" and cl["size_bytes"] == 16 * MiB
        u = c.call("usage")
        assert {x["volume"] for x in u["volumes"]} == {"vm1", "copy"}
        assert u["store"]["pool_bytes"] > 0
        assert c.call("usage", volume="vm1")["volumes"][0]["snapshots"][0]["name"] == "s1"
        assert c.call("flush") is None
        assert c.call("check")["ok"] is True
        st = c.call("status")
        assert st["running"] and st["pid"] == server.pid and st["store"] == server.store
        assert st["nbd_socket"] == server.nbd_socket and st["control_socket"] == server.control_socket
        assert st["exports"] == {"vm1": {"connections": 1, "revoked": 0}}
        assert st["uptime_seconds"] >= 0
        h.shutdown()
        del h
        wait_until(lambda: "vm1" not in c.call("status")["exports"],
                   what="the server to see vm1's client go")
        r = c.call("rollback", volume="vm1", snapshot="s1")
        assert r["snapshot_id"] == s1["id"] and r["disconnected"] == 0
        assert c.call("volume.info", name="vm1")["size_bytes"] == 16 * MiB
        assert c.call("snapshot.delete", volume="vm1", snapshot=s2["name"])["deleted"]
        assert c.call("volume.delete", name="copy")["deleted"]
        with pytest.raises(errors.VolumeNotFound):
            c.call("volume.info", name="copy")
        with pytest.raises(errors.SnapshotNotFound):
            c.call("snapshot.info", volume="vm1", snapshot="nope")
        with pytest.raises(errors.AlreadyExists):
            c.call("volume.create", name="vm1", size_bytes=MiB)
        with pytest.raises(errors.InvalidName):
            c.call("volume.create", name="bad name", size_bytes=MiB)
        with pytest.raises(errors.InvalidSize):
            c.call("volume.create", name="odd", size_bytes=1000)
        assert c.call("stop") == {"stopping": True}
    assert srv._wait_gone(server.pid, 10)
    for f in (server.control_socket, server.nbd_socket, srv.paths(server.store)["pidfile"]):
        assert f is not None and not os.path.exists(f)


def test_bad_requests_get_error_replies(server: Served) -> None:
    raw = Raw(server.control_socket)

    def bad(data: bytes, code: str = "invalid-argument", req_id: Any = None) -> None:
        reply = raw.send(data)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["id"] == req_id and reply["error"]["message"]
        ok = raw.ask({"id": "after", "op": "volume.list"})  # the connection is still usable
        assert ok == {"id": "after", "ok": True, "result": []}

    bad(b"{not json\n")
    bad(b"\xff\xfe\n")
    bad(b"[1, 2]\n")
    bad(b'{"id": 1}\n', req_id=1)
    bad(b'{"id": 2, "op": 7}\n', req_id=2)
    bad(b'{"id": 3, "op": "volume.list", "args": [1]}\n', req_id=3)
    bad(b'{"id": 4, "op": "volume.list", "extra": 1}\n', req_id=4)
    bad(b'{"id": {"x": 1}, "op": "volume.list"}\n')
    bad(b'{"id": 5, "op": "no.such.op"}\n', code="unsupported", req_id=5)
    bad(b'{"id": 6, "op": "volume.create", "args": {"name": "v"}}\n', req_id=6)
    bad(b'{"id": 7, "op": "volume.create", "args": {"name": "v", "size_bytes": "1G"}}\n', req_id=7)
    bad(b'{"id": 8, "op": "volume.create", "args": {"name": "v", "size_bytes": true}}\n', req_id=8)
    bad(b'{"id": 9, "op": "volume.create", "args": {"name": 5, "size_bytes": 4096}}\n', req_id=9)
    bad(b'{"id": 10, "op": "volume.list", "args": {"x": 1}}\n', req_id=10)
    bad(b'{"id": 11, "op": "rollback", "args": {"volume": "v", "snapshot": "s", "force": 1}}\n',
        req_id=11)
    bad(b'{"id": 12, "op": "snapshot.create", "args": {"volume": "nope"}}\n',
        code="volume-not-found", req_id=12)
    assert raw.send(b"\n\n" + json.dumps({"id": 13, "op": "flush"}).encode() + b"\n")["ok"]
    # Oversized: an error reply, then the server closes this connection...
    reply = raw.send(b'{"id": 14, "op": "volume.list", "pad": "' + b"x" * (2 * MiB) + b'"}\n')
    assert reply["ok"] is False and reply["error"]["code"] == "invalid-argument"
    assert "longer than" in reply["error"]["message"]
    assert raw.read() is None
    raw.close()
    # ...and goes on serving others.
    with server.client() as c:
        assert c.call("volume.list") == []
        with pytest.raises(errors.Unsupported):
            c.call("nope")
        with pytest.raises(errors.InvalidArgument):
            c.call("volume.info")


def test_rollback_with_connected_clients(server: Served) -> None:
    c = server.client()
    c.call("volume.create", name="vm1", size_bytes=8 * MiB)
    h = server.connect("vm1")
    h.pwrite(b"1" * BS, 0)
    c.call("snapshot.create", volume="vm1", name="one")
    h.pwrite(b"2" * BS, 0)
    snap = server.connect("vm1@one")
    with pytest.raises(errors.Busy) as e:
        c.call("rollback", volume="vm1", snapshot="one")
    assert "connected" in e.value.message and "force" in e.value.message
    assert h.pread(BS, 0) == b"2" * BS  # refused: nothing changed
    r = c.call("rollback", volume="vm1", snapshot="one", force=True)
    assert r["disconnected"] == 1
    # The old connection must not go on with stale data: the server has shut it down (or,
    # where it cannot tell the client's socket, fails its every request with ESHUTDOWN).
    for op in (lambda: h.pread(BS, 0), lambda: h.pwrite(b"3" * BS, 0), h.flush):
        with pytest.raises(nbd.Error):
            op()
    assert snap.pread(BS, 0) == b"1" * BS  # snapshot exports are not affected
    fresh = server.connect("vm1")
    assert fresh.pread(BS, 0) == b"1" * BS
    wait_until(lambda: c.call("status")["exports"]["vm1"] == {"connections": 1, "revoked": 0},
               what="the revoked connection to be gone (one live one left)")
    # Now a plain rollback is refused again because of the fresh client, then allowed.
    with pytest.raises(errors.Busy):
        c.call("rollback", volume="vm1", snapshot="one")
    fresh.shutdown()
    del fresh
    wait_until(lambda: "vm1" not in c.call("status")["exports"],
               what="the server to see the fresh client go")
    assert c.call("rollback", volume="vm1", snapshot="one")["disconnected"] == 0
    c.close()


def test_revoked_client_without_known_socket_gets_eshutdown(server: Served) -> None:
    """Two clients in their handshake at once: the plugin cannot tell which socket is whose,
    so a forced rollback cannot disconnect them; their requests fail with ESHUTDOWN instead."""
    c = server.client()
    c.call("volume.create", name="vm1", size_bytes=MiB)
    c.call("snapshot.create", volume="vm1", name="s")
    lurker = socket.socket(socket.AF_UNIX)  # an unclaimed client socket: every open is ambiguous
    lurker.connect(server.nbd_socket or "")
    try:
        h = server.connect("vm1")
        h.pread(BS, 0)
        assert c.call("rollback", volume="vm1", snapshot="s", force=True)["disconnected"] == 1
        with pytest.raises(nbd.Error) as e:
            h.pread(BS, 0)
        assert e.value.errnum == errno.ESHUTDOWN
        assert c.call("status")["exports"]["vm1"] == {"connections": 0, "revoked": 1}
    finally:
        lurker.close()
        c.close()


def test_delete_refused_while_connected(server: Served) -> None:
    with server.client() as c:
        c.call("volume.create", name="vm1", size_bytes=MiB)
        c.call("snapshot.create", volume="vm1", name="s")
        h = server.connect("vm1@s")
        with pytest.raises(errors.Busy):
            c.call("volume.delete", name="vm1")
        with pytest.raises(errors.Busy):
            c.call("snapshot.delete", volume="vm1", snapshot="s")
        h.shutdown()
        del h
        live = server.connect("vm1")
        with pytest.raises(errors.Busy) as e:
            c.call("volume.delete", name="vm1")
        assert "vm1" in e.value.message
        c.call("snapshot.delete", volume="vm1", snapshot="s")  # nobody on that export
        live.shutdown()
        del live
        wait_until(lambda: c.call("volume.info", name="vm1")["connections"] == 0,
                   what="vm1's live client to go")
        assert c.call("volume.delete", name="vm1")["deleted"]


def test_second_serve_and_local_writers_refused(server: Served) -> None:
    with pytest.raises(errors.StoreLocked) as e:
        srv.serve(server.store)
    assert str(server.pid) in e.value.message
    with pytest.raises(errors.StoreLocked):
        LocalBackend(server.store)
    b = open_backend(server.store)
    try:
        assert b.remote
        b.call("volume.create", name="via-backend", size_bytes=MiB)
    finally:
        b.close()
    st = srv.status(server.store)
    assert st["running"] and st["pid"] == server.pid and "via-backend" not in st["exports"]


def test_local_backend(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    with open_backend(store) as b:
        assert not b.remote
        b.call("volume.create", name="v", size_bytes=MiB)
        assert b.call("snapshot.create", volume="v", name="s")["name"] == "s"
        assert b.call("status") == {"running": False, "store": store}
        with pytest.raises(errors.NotRunning):
            b.call("stop")
        with pytest.raises(errors.InvalidArgument):
            b.call("volume.info", name=3)
        # A second writer, in another process, is refused with a clear error.
        code = ("import sys; from snapdisk.control.backend import open_backend\n"
                "try:\n    open_backend(sys.argv[1])\n"
                "except Exception as e:\n    print(type(e).__name__, e)\n")
        out = subprocess.run([sys.executable, "-c", code, store], capture_output=True, text=True,
                             timeout=60).stdout
        assert out.startswith("StoreLocked") and "in use by another process" in out
        with pytest.raises(errors.StoreLocked):
            srv.serve(store)
        assert b.call("volume.list")[0]["name"] == "v"
    with open_backend(store) as b:  # released at close
        assert b.call("snapshot.list", volume="v")[0]["name"] == "s"


def test_stop_status_and_stale_files(tmp_path: Path, served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    s = served(store)
    # kill -9: the pid file and sockets stay behind; status says not running, serve cleans up.
    os.kill(s.pid, signal.SIGKILL)
    assert srv._wait_gone(s.pid, 10)
    assert os.path.exists(srv.paths(store)["pidfile"])
    assert srv.status(store)["running"] is False
    s2 = served(store)
    assert s2.pid != s.pid and s2.connect("v").get_size() == MiB
    assert srv.stop(store, timeout=10) == s2.pid
    assert not srv._alive(s2.pid)
    assert not any(os.path.exists(p) for p in (s2.control_socket, srv.paths(store)["pidfile"]))
    with pytest.raises(errors.NotRunning):
        srv.stop(store)
    assert srv.status(store)["running"] is False
    with pytest.raises(errors.NotRunning):
        Client(srv.paths(store)["control_socket"])


def test_stop_falls_back_to_signals(tmp_path: Path, served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store")
    s = served(store)
    os.kill(s.pid, signal.SIGSTOP)  # answers nothing, not even SIGTERM, until killed
    try:
        t = time.monotonic()
        assert srv.stop(store, timeout=1) == s.pid
        assert time.monotonic() - t < 10
        assert not srv._alive(s.pid)
    finally:
        if srv._alive(s.pid):
            os.kill(s.pid, signal.SIGKILL)


def test_serve_reports_start_failures(tmp_path: Path) -> None:
    with pytest.raises(errors.StoreNotFound):
        srv.serve(str(tmp_path / "nothing"))
    store = make_store(tmp_path / "store")
    with pytest.raises(errors.ServerError) as e:
        srv.serve(store, nbdkit=str(tmp_path / "no-nbdkit"))
    assert "not found" in e.value.message
    assert srv.running_pid(store) is None


def test_client_timeout_and_errors(server: Served) -> None:
    with server.client(timeout=5) as c:
        with pytest.raises(errors.VolumeNotFound) as e:
            c.call("volume.delete", name="ghost")
        assert e.value.code == "volume-not-found" and "ghost" in e.value.message
    c.close()  # idempotent
    with pytest.raises(errors.NotRunning):
        c.call("volume.list")


def test_foreground_server_under_a_supervisor(tmp_path: Path) -> None:
    """What systemd runs (`serve --foreground`): nbdkit -f as a child; SIGTERM ends it cleanly
    (store closed, control socket removed), with a client still connected."""
    store = make_store(tmp_path / "store", volumes={"v": MiB})

    def up(proc: subprocess.Popen[str], *sockets: str) -> bool:
        """Whether the server's sockets exist; a server that exited fails the test at once."""
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return all(os.path.exists(srv.paths(store)[s]) for s in sockets)

    argv, env = srv.nbdkit_command(store, foreground=True, exit_with_parent=True)
    assert "--foreground" in argv and "--exit-with-parent" in argv
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: up(proc, "control_socket", "nbd_socket"), timeout=30,
                   what="both sockets of the foreground server")
        assert srv.running_pid(store) == proc.pid
        with Client(srv.paths(store)["control_socket"]) as c:
            assert c.call("status")["pid"] == proc.pid
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///v?socket={srv.paths(store)['nbd_socket']}")
        h.pwrite(b"f" * BS, 0)
        # A client is connected: nbdkit 1.32 on SIGTERM waits for it; `stop` cuts it off.
        assert srv.stop(store, timeout=10) == proc.pid
        assert proc.wait(10) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "store closed" in err, err
        assert not os.path.exists(srv.paths(store)["control_socket"])
        # A plain SIGTERM with no client connected stops it cleanly too.
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: up(proc, "control_socket"), timeout=30,
                   what="the control socket of the foreground server")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "store closed" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open_backend(store) as b:  # the store was released
        assert not b.remote


def test_replies_over_a_mebibyte(tmp_path: Path, served: Callable[..., Served]) -> None:
    """usage with 14 volumes at both snapshot quotas (256 manual + 256 automatic each, long
    names) is a reply of about 2 MiB, past the request-line limit: the client reads it."""
    vols = {f"vol{i:02d}-{'x' * 50}": MiB for i in range(14)}
    store = make_store(tmp_path / "store", volumes=vols)
    with _engine(store) as e:
        for name in vols:
            for k in range(256):
                e.create_snapshot(name, f"manual-{k:03d}-{'y' * 50}", "manual")
                e.create_snapshot(name, f"auto-{k:03d}-{'z' * 50}", "auto", "hourly")
        with pytest.raises(errors.QuotaExceeded):  # (at the quota indeed)
            e.create_snapshot(next(iter(vols)), "one-more", "manual")
    s = served(store)
    with s.client() as c:
        u = c.call("usage")
        assert len(protocol.encode(u)) > protocol.MAX_LINE_BYTES
        assert len(u["volumes"]) == 14 and all(len(v["snapshots"]) == 512 for v in u["volumes"])
        assert len(c.call("snapshot.list", volume=next(iter(vols)))) == 512
        assert c.call("status")["running"]  # the connection is still in step


def _engine(store: str) -> Any:
    from snapdisk.volume import Engine
    return Engine.open(store)


def test_200_concurrent_clients(server: Served) -> None:
    """A burst of clients past any small listen backlog: every one connects (the server
    listens with SOMAXCONN, the client retries EAGAIN within its timeout) and is answered."""
    import threading
    results: list[object] = []
    errs: list[BaseException] = []
    go = threading.Event()

    def one() -> None:
        go.wait()
        try:
            with Client(server.control_socket, timeout=60) as c:
                results.append(c.call("volume.list"))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errs.append(e)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(120)
    assert not errs, f"{len(errs)} of 200 failed: {errs[:3]}"
    assert results == [[]] * 200


def test_jobs_in_the_server(server: Served) -> None:
    """The long ops as jobs in the nbdkit process: events, the result, the same errors."""
    with server.client() as c:
        c.call("volume.create", name="vm1", size_bytes=8 * MiB)
        c.call("snapshot.create", volume="vm1", name="s1")
        job = c.start_job("rollback", volume="vm1", snapshot="s1")
        events = list(job.events())
        assert events[-1] == {"event": "job.finished", "job": job.id, "ok": True,
                              "result": job.outcome()}
        assert job.outcome()["snapshot_id"] == 1
        h = server.connect("vm1")
        with pytest.raises(errors.Busy):  # the connected-clients rule holds for jobs too
            c.start_job("rollback", volume="vm1", snapshot="s1").outcome()
        h.shutdown()
        assert c.start_job("clone", volume="vm1", snapshot="s1", name="c1").outcome()["name"] == "c1"
        assert c.start_job("snapshot.delete", volume="vm1", snapshot="s1").outcome()["deleted"]
        assert c.start_job("volume.delete", name="c1").outcome()["deleted"]
        assert [j["op"] for j in c.call("job.list")] == [
            "rollback", "rollback", "clone", "snapshot.delete", "volume.delete"]
