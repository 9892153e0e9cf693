"""Encrypted vs plain volumes on one store, over NBD with fio (issue 11's benchmark rows).

    python -m benchmarks.encryption [--seconds S] [--size BYTES] [--out DIR]

One server, two volumes of the same size ("plain" and "enc", AES-256-XTS, unlocked with
`serve --unlock`), both filled sequentially first so every run reads and overwrites allocated
blocks; then for each workload the plain volume and the encrypted one are measured back to back
(alternating, twice, best of two: the machine is shared) and the ratio enc/plain printed.
Targets from the issue: >= 0.90x for 4 KiB random QD16, >= 0.80x for 1 MiB sequential QD4.
Not part of scripts/bench yet (a stand-alone run; --out keeps fio's JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from snapdisk import daemon, keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

from . import fio

TARGETS = {"randread": 0.90, "randwrite": 0.90, "seqread": 0.80, "seqwrite": 0.80}


def make_store(path: str, size: int) -> None:
    with Engine.create(path, StoreConfig(pool_bytes=4 * size)) as e:
        e.create_volume("plain", size)
        e.create_volume("enc", size, encrypt=keys.Secret(passphrase=b"bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=256 << 20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="snapdisk-enc-bench-")
    store = os.path.join(out, "store")
    make_store(store, a.size)
    pid = None
    try:
        info = daemon.serve(store, timeout=60)
        pid = info.pid
        from snapdisk.control.client import Client
        with Client(info.control_socket) as c:
            c.call("key.unlock", volume="enc", passphrase="bench")
        fill = fio.WORKLOADS["seqwrite"]
        for vol in ("plain", "enc"):
            fio.run(fio.Target(uri=info.uri(vol)), fill, out, f"fill-{vol}", io_size=a.size)
        rows = {}
        for name, target in TARGETS.items():
            w = fio.WORKLOADS[name]
            best = {"plain": 0.0, "enc": 0.0}
            for rep in range(2):
                for vol in ("plain", "enc"):
                    r = fio.run(fio.Target(uri=info.uri(vol)), w, out, f"{name}-{vol}-{rep}",
                                seconds=a.seconds, ramp_s=0.5)
                    best[vol] = max(best[vol], r.bw_bytes)
            ratio = best["enc"] / best["plain"] if best["plain"] else 0.0
            rows[name] = {"plain_MiBps": best["plain"] / 2**20, "enc_MiBps": best["enc"] / 2**20,
                          "ratio": ratio, "target": target}
            print(f"{w.label:<28} plain {best['plain'] / 2**20:8.1f} MiB/s   "
                  f"encrypted {best['enc'] / 2**20:8.1f} MiB/s   {ratio:5.2f}x "
                  f"(target {target:.2f}x)", flush=True)
        with open(os.path.join(out, "encryption.json"), "w") as f2:
            json.dump(rows, f2, indent=1)
    finally:
        if pid is not None:
            daemon.stop(store, timeout=30)


if __name__ == "__main__":
    main()
