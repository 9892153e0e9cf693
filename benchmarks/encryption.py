"""Scenario 10 (issue 11): encrypted vs plain volumes on one store, and `snapshot copy --encrypt`.

In `scripts/bench` as the scenario `encryption` (`scripts/bench --quick --only encryption`), or
stand-alone: `python -m benchmarks.encryption [--seconds S] [--size BYTES] [--out DIR]`.

One store and one server, two volumes of the same size: "plain" and "enc" (AES-256-XTS, unlocked
over the control socket), both filled sequentially first so that every run reads and overwrites
allocated blocks.  Per round, for each workload (4 KiB random read/write at QD16, 1 MiB
sequential read/write at QD4, fio over NBD) the plain volume and the encrypted one run back to
back, the order swapped every round; the ratio enc/plain is taken per round.  Targets from the
issue: >= 0.90x for 4 KiB random, >= 0.80x for 1 MiB sequential.

Then, in the same server: the plain volume's snapshot copied into a new encrypted volume with
`snapshot.copy` (`encrypt`, a key file's key: no scrypt in the timing), beside `nbdcopy` of the
same snapshot's export into a new plain volume of the same size; MiB/s of the snapshot's
allocated bytes, the copies deleted after each round.  No target: the issue asks for the two
figures side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from snapdisk import keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

from . import fio
from .report_base import Doc, Target, fmt_span

TARGETS = {"randread": 0.90, "randwrite": 0.90, "seqread": 0.80, "seqwrite": 0.80}
PASSPHRASE = "bench"
COPY_KEY = bytes(range(32))  # a key file's 32 bytes for the copies (the bench's own, not secret)


def make_store(path: str, size: int) -> None:
    with Engine.create(path, StoreConfig(pool_bytes=6 * size)) as e:
        e.create_volume("plain", size)
        e.create_volume("enc", size, encrypt=keys.Secret(passphrase=PASSPHRASE.encode()))


@contextlib.contextmanager
def served(store: str) -> Iterator[Any]:
    """A server on store (its pid in peers.STARTED), stopped by pid at the end."""
    from snapdisk import daemon

    from . import peers
    info = daemon.serve(store, timeout=60)
    peers.STARTED.append(info.pid)
    try:
        yield info
    finally:
        with contextlib.suppress(Exception):
            daemon.stop(store, timeout=30)
        peers.kill_pid(info.pid)


def _copies(c: Any, info: Any, size: int, tag: int) -> dict[str, float]:
    """One `snapshot.copy --encrypt` and one nbdcopy of plain@src: seconds each."""
    out: dict[str, float] = {}
    enc_name, nbd_name = f"copy-enc-{tag}", f"copy-nbd-{tag}"
    order = ("encrypt", "nbdcopy") if tag % 2 == 0 else ("nbdcopy", "encrypt")
    for what in order:
        if what == "encrypt":
            t0 = time.monotonic()
            res = c.start_job("snapshot.copy", volume="plain", snapshot="src", name=enc_name,
                              encrypt=True, key_hex=COPY_KEY.hex()).wait()
            out["encrypt_s"] = time.monotonic() - t0
            if not res.get("ok"):
                raise RuntimeError(f"snapshot.copy failed: {res}")
        else:
            c.call("volume.create", name=nbd_name, size_bytes=size)
            t0 = time.monotonic()
            subprocess.run(["nbdcopy", info.uri("plain@src"), info.uri(nbd_name)], check=True,
                           capture_output=True, timeout=1800)
            out["nbdcopy_s"] = time.monotonic() - t0
    for name in (enc_name, nbd_name):
        c.call("volume.delete", name=name)
    return out


def measure(store: str, size: int, rounds: int, seconds: float, ramp_s: float,
            fio_dir: str) -> dict[str, Any]:
    from snapdisk.control.client import Client
    rows: list[dict[str, Any]] = []
    copies: list[dict[str, float]] = []
    with served(store) as info, Client(info.control_socket, timeout=1800) as c:
        c.call("key.unlock", volume="enc", passphrase=PASSPHRASE)
        fill = fio.WORKLOADS["seqwrite"]
        for vol in ("plain", "enc"):
            fio.run(fio.Target(uri=info.uri(vol)), fill, fio_dir, f"enc-fill-{vol}", io_size=size)
        for r in range(rounds):
            for name in TARGETS:
                w, row = fio.WORKLOADS[name], {"round": r, "workload": name}
                for vol in (("plain", "enc") if r % 2 == 0 else ("enc", "plain")):
                    res = fio.run(fio.Target(uri=info.uri(vol)), w, fio_dir, f"enc-{name}-{vol}-r{r}",
                                  seconds=seconds, ramp_s=ramp_s)
                    row[f"{vol}_bw_bytes"], row[f"{vol}_iops"] = res.bw_bytes, res.iops
                rows.append(row)
        c.call("snapshot.create", volume="plain", name="src")
        allocated = int(c.call("volume.info", name="plain")["live_bytes"])
        for r in range(rounds):
            copies.append({"round": r, **_copies(c, info, size, r)})
    return {"size": size, "seconds": seconds, "rounds": rounds, "rows": rows,
            "copy_bytes": allocated, "copies": copies}


def scenario(lab: Any) -> dict[str, Any]:
    """The `encryption` scenario of scripts/bench, on its own store in the lab's directory."""
    s = lab.s
    store = lab.path("snapdisk-encryption")
    t0 = time.monotonic()
    make_store(store, s.size)
    lab.prep_seconds["snapdisk-encryption"] = round(time.monotonic() - t0, 2)
    try:
        return measure(store, s.size, s.rounds, s.seconds, s.ramp_s, lab.fio_dir)
    finally:
        if not s.keep:
            import shutil
            shutil.rmtree(store, ignore_errors=True)


def section(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    mib = float(1 << 20)
    doc("## 10. Encrypted volumes", "",
        f"One store, one server: a plain and an encrypted (AES-256-XTS) volume of "
        f"{d['size'] / mib:.0f} MiB, both filled first; fio over NBD, each workload on both "
        f"volumes back to back ({d['seconds']} s each), the order swapped every round; the ratio "
        "encrypted / plain per round.", "")
    rows = d["rows"]
    table, ratios = [], {}
    for name in TARGETS:
        rs = [r for r in rows if r["workload"] == name]
        key = "bw_bytes" if name.startswith("seq") else "iops"
        ratios[name] = [r[f"enc_{key}"] / r[f"plain_{key}"] for r in rs if r[f"plain_{key}"]]
        unit = "MiB/s" if key == "bw_bytes" else "IOPS"
        scale = mib if key == "bw_bytes" else 1.0
        table.append([fio.WORKLOADS[name].label,
                      fmt_span([r[f"plain_{key}"] / scale for r in rs], "{:,.0f}", f" {unit}"),
                      fmt_span([r[f"enc_{key}"] / scale for r in rs], "{:,.0f}", f" {unit}"),
                      fmt_span(ratios[name])])
    doc.table(["workload", "plain", "encrypted", "ratio"], table, align="lrrr")
    doc("")
    for name, goal in TARGETS.items():
        targets.append(Target(f"Encrypted / plain volume: {fio.WORKLOADS[name].label}",
                              ratios[name], lo=goal))
    cp = d.get("copies") or []
    if cp:
        n = d["copy_bytes"] / mib
        enc = [n / c["encrypt_s"] for c in cp if c.get("encrypt_s")]
        nbd = [n / c["nbdcopy_s"] for c in cp if c.get("nbdcopy_s")]
        doc(f"The plain volume's snapshot ({n:.0f} MiB allocated) copied into a new volume, "
            "in the same server, alternating which goes first:", "")
        doc.table(["copy", "MiB/s"],
                  [["`snapshot copy --encrypt` (a job, key file: no KDF)", fmt_span(enc, "{:.0f}")],
                   ["`nbdcopy` of the snapshot's export into a plain volume", fmt_span(nbd, "{:.0f}")],
                   ["ratio", fmt_span([a / b for a, b in zip(enc, nbd, strict=False) if b])]],
                  align="lr")
        doc("")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="snapdisk-enc-bench-")
    store = os.path.join(out, "store")
    make_store(store, a.size)
    d = measure(store, a.size, a.rounds, a.seconds, 0.5, out)
    with open(os.path.join(out, "encryption.json"), "w") as f:
        json.dump(d, f, indent=1)
    doc, targets = Doc(out), []  # type: ignore[var-annotated]
    section(doc, d, targets)
    print(doc.text())
    for t in targets:
        print(f"{t.what}: {fmt_span(t.values)} {t.verdict()}")


if __name__ == "__main__":
    main()
