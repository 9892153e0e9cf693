"""The server's process lifecycle (snapdisk.daemon, snapdisk.pidfile): which process is the
server, what stop may touch, the thread model, and clients that vanish mid-request."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Served, make_store
from e2e_helpers import SNAPDISK, run_cli
from waiting import wait_until

from snapdisk import daemon as srv
from snapdisk import errors
from snapdisk.pidfile import alive, proc_stat

MiB = 1 << 20
BS = 4096


@pytest.fixture
def impostor() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line says nbdkit: `exec -a nbdkit sleep 100`."""
    p = subprocess.Popen(["bash", "-c", "exec -a nbdkit sleep 100"])
    try:
        wait_until(lambda: b"nbdkit" in Path(f"/proc/{p.pid}/cmdline").read_bytes(),
                   what="the impostor's exec -a nbdkit")
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("content", ["{pid}\n", "{pid} {wrong}\n"])
def test_a_stale_pid_file_naming_another_process(tmp_path: Path, served: Callable[..., Served],
                                                 impostor: subprocess.Popen[bytes],
                                                 content: str) -> None:
    """Neither nbdkit's pid-only format nor a start time that is not the process's makes it
    the server: status says not running, stop signals nothing, serve starts."""
    store = make_store(tmp_path / "store", volumes={"v": MiB})
    pidfile = srv.paths(store)["pidfile"]
    st = proc_stat(impostor.pid)
    assert st is not None
    Path(pidfile).write_text(content.format(pid=impostor.pid, wrong=st[1] + 1))
    assert srv.running_pid(store) is None
    assert srv.status(store)["running"] is False
    with pytest.raises(errors.NotRunning):
        srv.stop(store, timeout=2)
    assert impostor.poll() is None
    Path(pidfile).write_text(content.format(pid=impostor.pid, wrong=st[1] + 1))
    s = served(store)
    assert s.pid != impostor.pid and srv.running_pid(store) == s.pid
    assert srv.stop(store, timeout=10) == s.pid
    assert impostor.poll() is None, "stop killed a process that was not the server"


def test_the_pid_file_records_the_start_time(served: Callable[..., Served],
                                             tmp_path: Path) -> None:
    s = served(make_store(tmp_path / "store"))
    pid, start = map(int, Path(srv.paths(s.store)["pidfile"]).read_text().split())
    st = proc_stat(pid)
    assert pid == s.pid and st is not None and st[1] == start


def test_stop_on_a_directory_that_is_no_store(tmp_path: Path) -> None:
    d = tmp_path / "not-a-store"
    d.mkdir()
    (d / "server.pid").write_text("1\n")
    with pytest.raises(errors.StoreNotFound):
        srv.stop(str(d))
    assert (d / "server.pid").read_text() == "1\n"
    r = run_cli(str(d), "stop", check=False)
    assert r.returncode == errors.StoreNotFound.exit_code, r
    assert (d / "server.pid").exists()


def test_parallel_threads_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    with pytest.raises(errors.Unsupported) as e:
        srv.serve(store, threads="parallel")
    assert "raw_send_socket" in e.value.message
    r = run_cli(store, "serve", "--threads", "parallel", check=False)
    assert r.returncode == errors.Unsupported.exit_code and "abort" in r.stderr, r
    assert srv.running_pid(store) is None


PIPELINER = textwrap.dedent("""
    import os, sys, nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    buf = nbd.Buffer.from_bytearray(bytearray(b"p" * 65536))
    for i in range(int(sys.argv[2])):
        h.aio_pwrite(buf, (i * 65536) % (8 << 20))
    h.poll(0)   # push what it can onto the socket, collect nothing
    os.kill(os.getpid(), 9)
""")


def test_a_client_dying_with_pipelined_writes(tmp_path: Path,
                                              served: Callable[..., Served]) -> None:
    """nbdkit 1.32.5's parallel model aborted here (raw_send_socket's assertion); the
    serialized model must survive it and serve the next client."""
    s = served(make_store(tmp_path / "store", volumes={"v": 8 * MiB}))
    for _ in range(5):
        r = subprocess.run([sys.executable, "-c", PIPELINER, s.uri("v"), "256"],
                           capture_output=True, timeout=60)
        assert r.returncode == -signal.SIGKILL, r.stderr
    assert alive(s.pid) and srv.running_pid(s.store) == s.pid
    h = s.connect("v")
    h.pwrite(b"n" * BS, 0)
    assert h.pread(BS, 0) == b"n" * BS
    h.shutdown()
    wait_until(lambda: s.call("volume.info", name="v")["connections"] == 0,  # type: ignore[index]
               what="a dead client's connection to be unregistered")


# ---- other users, and empty store paths --------------------------------------------------

def as_nobody(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
           *SNAPDISK, "--store", store, *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(srv.python_path()))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/", env=env)


@pytest.fixture
def root_store() -> Iterator[str]:
    """A store of root's (0700) in a directory everyone may look into."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    parent = tempfile.mkdtemp(prefix="snapdisk-perm-")
    os.chmod(parent, 0o755)
    try:
        yield make_store(os.path.join(parent, "store"), volumes={"v": MiB})
    finally:
        shutil.rmtree(parent)


@pytest.mark.parametrize("args", [["volume", "list"], ["status"], ["stop"], ["serve"]])
def test_another_user_is_told_permission_denied(root_store: str, args: list[str]) -> None:
    r = as_nobody(root_store, *args)
    assert r.returncode == errors.PermissionDenied.exit_code, r
    assert "permission denied" in r.stderr and "Traceback" not in r.stderr, r


def test_another_user_of_a_served_store(root_store: str, served: Callable[..., Served]) -> None:
    s = served(root_store)
    for args in (["status"], ["volume", "list"], ["stop"]):
        r = as_nobody(root_store, *args)
        assert r.returncode == errors.PermissionDenied.exit_code, r
    assert alive(s.pid)


def test_an_empty_store_path_is_refused(tmp_path: Path) -> None:
    env = dict(os.environ, SNAPDISK_STORE=str(tmp_path / "elsewhere"))
    for extra_env, args in (({}, ["--store", "", "volume", "list"]),
                            ({"SNAPDISK_STORE": ""}, ["volume", "list"])):
        r = subprocess.run([*SNAPDISK, *args], capture_output=True,
                           text=True, timeout=60, env={**env, **extra_env})
        assert r.returncode == errors.InvalidArgument.exit_code, r
        assert "empty" in r.stderr, r
