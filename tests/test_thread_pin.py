"""The plugin keeps each connection thread's Python thread state for the whole connection
(nbd_plugin._pin_thread_state): without it nbdkit's PyGILState_Ensure/Release make and destroy
one per callback, most of a Python plugin's cost per request (docs/design.md, "The read hot
path").  Checked through a threading.local, which CPython keeps in the thread state."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from snapdisk.daemon import python_path

PLUGIN = os.path.join(os.path.dirname(__file__), "fixtures", "pin_plugin.py")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(pin: bool) -> str:
        sock = str(tmp_path / f"pin{len(procs)}.sock")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path())}
        p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "--unix", sock, "python", PLUGIN,
                              f"pin={int(pin)}"], env=env, stdin=subprocess.DEVNULL)
        procs.append(p)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        return sock

    yield start
    for p in procs:  # by pid, even on failure
        p.kill()
        p.wait(10)


def reads(sock: str, n: int) -> list[tuple[int, int]]:
    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        out = []
        for _ in range(n):
            b = h.pread(16, 0)
            out.append((int.from_bytes(b[:8], "little"), int.from_bytes(b[8:], "little")))
        return out
    finally:
        h.shutdown()


def test_a_connection_keeps_its_thread_state(server) -> None:  # type: ignore[no-untyped-def]
    sock = server(True)
    # Every request on the connection's own thread, its locals kept from one to the next.
    assert reads(sock, 4) == [(1, 1), (2, 1), (3, 1), (4, 1)]
    # A new connection: a new thread; the old one's state was released at close (no crash).
    assert reads(sock, 2) == [(1, 1), (2, 1)]


def test_without_the_pin_each_callback_gets_a_new_thread_state(server) -> None:  # type: ignore[no-untyped-def]
    # The control: what nbdkit does by itself (so the test above can fail).
    assert reads(server(False), 3) == [(1, 1), (1, 1), (1, 1)]
