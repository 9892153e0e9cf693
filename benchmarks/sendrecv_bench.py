"""`send | receive` of a full volume between two stores against `nbdcopy` of the same snapshot
between the two stores' NBD exports (issue 13: >= 1.0x).

    python -m benchmarks.sendrecv_bench --quick|--full [--size BYTES] [--out DIR]

Store A gets one volume (1 GiB; --quick 64 MiB) written whole with random (incompressible)
data, and a snapshot.  Both stores are served (nbdkit + the plugin), as a user with a running
server has them; then, alternately, three times each (the machine is shared: best of three):
  send|receive  `snapdisk send v@s | snapdisk receive wN` through a real shell pipe, both
                commands going through their store's server (descriptors passed to it);
  nbdcopy       `nbdcopy nbd+unix:///v@s?... nbd+unix:///cN?...` onto a new volume of B.
Each run receives into a new volume of B.  The ratio is nbdcopy's time over
send|receive's (higher is better for snapdisk).  `run(quick)` returns the figures for
scripts/bench; it is not wired in there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from snapdisk import daemon
from snapdisk.control.client import Client
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

TARGET = 1.0
REPS = 3
CLI = f"{sys.executable} -m snapdisk.cli"


def _fill(store: str, size: int) -> None:
    with Engine.create(store, StoreConfig(pool_bytes=4 * size + (256 << 20))) as e:
        e.create_volume("v", size)
        vol = e.volume_id("v")
        chunk = 4 << 20
        for off in range(0, size, chunk):
            e.write(vol, off, os.urandom(min(chunk, size - off)))
        e.create_snapshot("v", "s")


# The CLIs run as installed: with their bytecode cached (a PYTHONDONTWRITEBYTECODE=1
# environment would recompile ~80 modules per command, ~0.1 s of CPU each side).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _timed(cmd: list[str] | str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                   executable="/bin/bash" if isinstance(cmd, str) else None, env=ENV)
    return time.perf_counter() - t


def run(quick: bool, size: int | None = None, out: str | None = None) -> dict[str, Any]:
    size = size or ((64 << 20) if quick else (1 << 30))
    root = out or tempfile.mkdtemp(prefix="snapdisk-sendrecv-bench-")
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    _fill(a, size)
    # room for every run's volume: deleting between runs would time the deletes' punching
    Engine.create(b, StoreConfig(pool_bytes=(2 * REPS + 1) * size + (256 << 20))).close()
    started = []
    try:
        ia = daemon.serve(a, timeout=60)
        started.append(a)
        ib = daemon.serve(b, timeout=60)
        started.append(b)
        _timed(f"{CLI} --store {a} volume list")  # caches the CLI's bytecode
        runs: dict[str, list[float]] = {"sendrecv": [], "nbdcopy": []}
        for rep in range(REPS):
            runs["sendrecv"].append(_timed(
                f"set -o pipefail; {CLI} --store {a} send v@s | "
                f"{CLI} --store {b} receive w{rep}"))
            with Client(ib.control_socket) as c:
                c.call("volume.create", name=f"c{rep}", size_bytes=size)
            runs["nbdcopy"].append(_timed(["nbdcopy", ia.uri("v@s"), ib.uri(f"c{rep}")]))
        best = {k: min(v) for k, v in runs.items()}
        ratio = best["nbdcopy"] / best["sendrecv"]
        fig = {"size_bytes": size, "sendrecv_s": round(best["sendrecv"], 3),
               "nbdcopy_s": round(best["nbdcopy"], 3),
               "sendrecv_MiBps": round(size / best["sendrecv"] / 2**20, 1),
               "nbdcopy_MiBps": round(size / best["nbdcopy"] / 2**20, 1),
               "ratio": round(ratio, 3), "target": TARGET,
               "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()}}
        return fig
    finally:
        for s in started:
            daemon.stop(s, timeout=30)
        if out is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="64 MiB (default)")
    g.add_argument("--full", action="store_true", help="1 GiB")
    ap.add_argument("--size", type=int, default=None, help="volume size in bytes")
    ap.add_argument("--out", default=None, help="keep the stores here")
    a = ap.parse_args()
    fig = run(not a.full, a.size, a.out)
    print(json.dumps(fig, indent=1))
    print(f"send|receive {fig['sendrecv_MiBps']:.1f} MiB/s, nbdcopy {fig['nbdcopy_MiBps']:.1f} "
          f"MiB/s: {fig['ratio']:.2f}x (target >= {TARGET:.1f}x)")


if __name__ == "__main__":
    main()
