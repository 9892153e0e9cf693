"""Shared helpers for the tests that drive the `snapdisk` command as a subprocess.

Everything a test starts (a server, an attached device, a mount) is registered with a Teardown
as soon as it exists, and torn down in reverse order even when the test fails: by pid and by
the exact device or path, never by name.  `leftovers()` lists what is still there afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

SNAPDISK = [sys.executable, "-m", "snapdisk.cli"]


class CLIResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.args = proc.args

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return (f"CLIResult({self.args!r}, rc={self.returncode}, stdout={self.stdout!r}, "
                f"stderr={self.stderr!r})")


def run_cli(store: str | None, *args: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> CLIResult:
    """Run `snapdisk [--store STORE] ARGS...`; with check, a non-zero exit fails the test."""
    cmd = SNAPDISK + (["--store", store] if store else []) + list(args)
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          stdin=subprocess.DEVNULL)
    r = CLIResult(proc)
    if check and r.returncode != 0:
        pytest.fail(f"snapdisk {' '.join(args)} failed: {r!r}")
    return r


class Teardown:
    """A stack of undo actions, run in reverse; each one's failure is reported, not raised,
    so that the rest still run."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[[], None]]] = []
        self.errors: list[str] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._stack.append((what, fn))

    def run(self) -> None:
        while self._stack:
            what, fn = self._stack.pop()
            try:
                fn()
            except Exception as e:  # keep tearing down the rest
                self.errors.append(f"{what}: {e!r}")


@pytest.fixture
def teardown() -> Iterator[Teardown]:
    td = Teardown()
    try:
        yield td
    finally:
        td.run()
    assert not td.errors, td.errors


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pid(pid: int, timeout: float = 10) -> None:
    """TERM, wait, then KILL one process by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def server_pid(store: str) -> int | None:
    try:
        with open(os.path.join(store, "server.pid")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def init_store(store: str, pool: str = "2G") -> str:
    run_cli(store, "init", "--pool-size", pool)
    return store


def serve_cli(store: str, teardown: Teardown, *serve_args: str) -> CLIResult:
    """`snapdisk serve [ARGS]` whatever its exit code (a wrong --unlock secret exits 14 with
    the server left running); any server it left gets a teardown that runs `snapdisk stop`
    and then makes sure, by pid, that the server is gone."""
    r = run_cli(store, "serve", *serve_args, check=False)
    pid = server_pid(store)
    if pid is not None:
        def stop() -> None:
            if pid_alive(pid):
                subprocess.run(SNAPDISK + ["--store", store, "stop"], capture_output=True,
                               timeout=60)
            if pid_alive(pid):
                kill_pid(pid)
            assert not pid_alive(pid)

        teardown.push(f"server {pid}", stop)
    return r


def start_server(store: str, teardown: Teardown, *serve_args: str) -> int:
    """`snapdisk serve [ARGS]`, which must succeed; stopped at teardown (serve_cli)."""
    r = serve_cli(store, teardown, *serve_args)
    if r.returncode != 0:
        pytest.fail(f"snapdisk serve failed: {r!r}")
    pid = server_pid(store)
    assert pid is not None, "serve left no server.pid"
    return pid


def attach_record(store: str, export: str) -> dict[str, Any]:
    with open(os.path.join(store, "attach", export + ".json")) as f:
        rec: dict[str, Any] = json.load(f)
    return rec


def attach(store: str, export: str, teardown: Teardown, *extra: str) -> str:
    """`snapdisk attach EXPORT`; the teardown detaches it, and failing that tears down the
    recorded loop device and nbdfuse by device and pid."""
    dev = run_cli(store, "attach", export, *extra).stdout.strip()
    rec = attach_record(store, export)
    assert rec["device"] == dev

    def undo() -> None:
        if not os.path.exists(os.path.join(store, "attach", export + ".json")):
            return  # the test detached it itself
        r = subprocess.run(SNAPDISK + ["--store", store, "detach", export], capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0:
            return
        if rec["method"] == "loop":
            subprocess.run(["losetup", "-d", dev], capture_output=True)
            subprocess.run(["fusermount3", "-u", "-z", rec["mountpoint"]], capture_output=True)
            if rec.get("nbdfuse_pid"):
                kill_pid(rec["nbdfuse_pid"])
        raise AssertionError(f"detach {export} failed: {r.stderr.strip()}")

    teardown.push(f"attach {export} ({dev})", undo)
    return dev


def mount(dev: str, where: str, teardown: Teardown, *options: str) -> str:
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", *options, dev, where], check=True, capture_output=True)

    def undo() -> None:
        if is_mounted(where):
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["fsfreeze", "-u", where], capture_output=True)
            subprocess.run(["umount", where], check=True, capture_output=True)

    teardown.push(f"mount {where}", undo)
    return where


def umount(where: str) -> None:
    subprocess.run(["umount", where], check=True, capture_output=True)


def is_mounted(where: str) -> bool:
    where = os.path.realpath(where)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == where for line in f)


def leftovers(root: str) -> list[str]:
    """Mounts, loop devices and processes that still refer to paths under root."""
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if root in line]
    if shutil.which("losetup"):
        out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        found += [f"loop {line}" for line in out.splitlines() if root in line]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root in cmd and int(pid) != os.getpid() and pid_alive(int(pid)):
            found.append(f"process {pid}: {cmd.strip()}")
    return found


def have_e2e() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    for tool in ("nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck", "nbdkit"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None
