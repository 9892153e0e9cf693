"""NBD over TCP: beside the unix socket, loopback only, TLS with the store's pre-shared key
required (a plain client is refused), plain text only when asked for by name."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import Served, make_store

from snapdisk import daemon as srv
from snapdisk import errors
from snapdisk.pidfile import alive

MiB = 1 << 20
BS = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_handle(port: int, psk_file: str, export: str, username: str = "snapdisk") -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(psk_file)
    h.set_tls_username(username)
    h.set_export_name(export)
    h.connect_tcp("127.0.0.1", str(port))
    return h


def test_tcp_on_loopback_only(tmp_path: Path, served: Callable[..., Served]) -> None:
    """(Was test_control's: TCP now requires TLS and sits beside the unix socket.)"""
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    for bad in ("tcp:0.0.0.0:10809", "tcp:192.168.1.1:10809", "tcp:127.0.0.1:0", "udp:x", "tcp:x:1"):
        with pytest.raises(errors.InvalidArgument):
            srv.serve(store, listen=bad)
    port = free_port()
    s = served(store, listen=f"tcp:127.0.0.1:{port}")
    psk = os.path.join(store, "tls.psk")
    assert s.nbd_socket == os.path.join(store, "nbd.sock")
    assert s.info.tcp_uri("v") == f"nbds://snapdisk@127.0.0.1:{port}/v?tls-psk-file={psk}"
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # libnbd's guard for URIs naming files (tls-psk-file)
    h.connect_uri(s.info.tcp_uri("v"))  # the URI serve prints works as it is (nbdinfo too)
    assert h.get_tls_negotiated()
    h.pwrite(b"t" * BS, 0)
    assert h.pread(BS, 0) == b"t" * BS
    st = s.call("status")
    assert st["tcp"] == f"tcp:127.0.0.1:{port}" and st["tls"] == "require"  # type: ignore[index]
    assert st["listen"] == f"unix:{s.nbd_socket}"  # type: ignore[index]


def test_tls_required_and_the_key_owner_only(tmp_path: Path,
                                             served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    port = free_port()
    s = served(store, listen=f"tcp:127.0.0.1:{port}")
    psk = s.info.tls_psk_file
    assert psk == os.path.join(store, "tls.psk")
    st = os.stat(psk)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.stat(store).st_uid
    user, _, key = Path(psk).read_text().strip().partition(":")
    assert user == "snapdisk" and len(key) == 64 and int(key, 16) >= 0
    # A plain client is refused at the handshake: the server requires TLS first.
    plain = nbd.NBD()
    with pytest.raises(nbd.Error) as e:
        plain.connect_uri(f"nbd://127.0.0.1:{port}/v")
    assert "TLS" in str(e.value)
    # So is one with the right name and the wrong key.
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("snapdisk:" + "ab" * 32 + "\n")
    wrong.chmod(0o600)
    with pytest.raises(nbd.Error):
        tls_handle(port, str(wrong), "v")
    # The key works, and the unix socket serves beside TCP at the same time (attach uses it).
    h = tls_handle(port, psk, "v")
    h.pwrite(b"k" * BS, BS)
    u = s.connect("v")
    assert u.pread(BS, BS) == b"k" * BS
    # A TCP client is a client of the store's server like any other: counted, and it
    # holds off a delete.
    with s.client() as c:
        assert c.call("volume.info", name="v")["connections"] == 2
        with pytest.raises(errors.Busy):
            c.call("volume.delete", name="v")
    h.shutdown()


def test_stop_ends_the_tcp_listener(tmp_path: Path, served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    port = free_port()
    s = served(store, listen=f"tcp:127.0.0.1:{port}")
    tcp_pid = s.call("status")["tcp_pid"]  # type: ignore[index]
    assert isinstance(tcp_pid, int) and alive(tcp_pid)
    h = tls_handle(port, s.info.tls_psk_file or "", "v")  # an idle client stays connected
    assert srv.stop(store, timeout=10) == s.pid
    assert not alive(s.pid) and not alive(tcp_pid)
    with pytest.raises(nbd.Error):
        h.pread(BS, 0)
    # The port is free again: a new server takes it.
    s2 = served(store, listen=f"tcp:127.0.0.1:{port}")
    assert tls_handle(port, s2.info.tls_psk_file or "", "v").get_size() == MiB


def test_plain_tcp_only_by_name(tmp_path: Path, served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    with pytest.raises(errors.InvalidArgument):
        srv.serve(store, insecure_plaintext_tcp=True)  # with no TCP to apply to
    port = free_port()
    s = served(store, listen=f"tcp:127.0.0.1:{port}", insecure_plaintext_tcp=True)
    assert s.info.tls_psk_file is None
    assert s.info.tcp_uri("v") == f"nbd://127.0.0.1:{port}/v"
    h = nbd.NBD()
    h.connect_uri(s.info.tcp_uri("v"))
    assert not h.get_tls_negotiated() and h.get_size() == MiB
    assert s.call("status")["tls"].startswith("off")  # type: ignore[index]


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    psk = Path(store) / "tls.psk"
    psk.write_text("snapdisk:" + "cd" * 32 + "\n")
    psk.chmod(0o644)
    with pytest.raises(errors.PermissionDenied) as e:
        srv.serve(store, listen=f"tcp:127.0.0.1:{free_port()}")
    assert "chmod 600" in e.value.message
    assert srv.running_pid(store) is None


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(errors.ServerError) as e:
            srv.serve(store, listen=f"tcp:127.0.0.1:{port}", timeout=30)
        assert "in use" in e.value.message
    assert srv.running_pid(store) is None


def test_a_killed_server_leaves_no_tcp_listener_behind(tmp_path: Path,
                                                       served: Callable[..., Served]) -> None:
    """nbdkit's --exit-with-parent waits for idle clients; the next serve ends that forwarder
    (by STORE/tcp.pid: pid and start time) and takes the port."""
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    port = free_port()
    s = served(store, listen=f"tcp:127.0.0.1:{port}")
    tcp_pid = s.call("status")["tcp_pid"]  # type: ignore[index]
    h = tls_handle(port, s.info.tls_psk_file or "", "v")
    os.kill(s.pid, 9)
    assert srv._wait_gone(s.pid, 10)
    try:
        s2 = served(store, listen=f"tcp:127.0.0.1:{port}")
        assert not alive(tcp_pid)
        assert tls_handle(port, s2.info.tls_psk_file or "", "v").get_size() == MiB
    finally:
        if alive(tcp_pid):
            os.kill(tcp_pid, 9)
    del h
