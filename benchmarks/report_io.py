"""Sections 1 (steady state), 2 (first writes after a snapshot) and 7 (the C core) of the report."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from benchmarks.report_base import (
    Doc,
    Target,
    _by,
    fmt_span,
    grouped,
    human_bytes,
    metric,
    plt,
    span,
    unit,
)

# ---- 1. steady state --------------------------------------------------------------------------

def steady_ratios(d: dict[str, Any], num: str, den: str | Callable[[int, str], float], w: str) -> list[float]:
    """Per-round ratio num/den on workload w; den is a peer name or f(round, workload)."""
    idx = _by(d["rows"], "round", "workload", "peer")
    out = []
    for r in sorted({row["round"] for row in d["rows"]}):
        a = idx.get((r, w, num))
        b = den(r, w) if callable(den) else (metric(idx[(r, w, den)], w) if (r, w, den) in idx else None)
        if a is not None and b:
            out.append(metric(a, w) / b)
    return out


def best_passthrough(d: dict[str, Any]) -> Callable[[int, str], float]:
    idx = _by(d["rows"], "round", "workload", "peer")

    def den(r: int, w: str) -> float:
        return max(metric(idx[(r, w, p)], w) for p in ("passthrough-serialized", "passthrough-parallel")
                   if (r, w, p) in idx)
    return den


def section_steady(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    n, mode = d["nsnaps"], d["default_threads"]
    wl = d["workloads"]
    peers_ = d["peers"]
    vals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in d["rows"]:
        vals[(row["peer"], row["workload"])].append(metric(row, row["workload"]))
    doc("## 1. Steady state", "",
        f"Every peer serves the same {human_bytes(d['size'])} of data; each fio run is "
        f"{d.get('seconds', '?')} s after a {d.get('ramp_s', '?')} s ramp; {d.get('rounds', '?')} "
        "rounds, each running every peer once per workload, the order rotated each round.  "
        "Throughput, median [min–max] over rounds:", "")
    doc.table(["peer"] + [f"{wl[w]} ({unit(w)})" for w in wl],
              [[p["label"]] + [fmt_span(vals[(p["name"], w)], "{:,.0f}") for w in wl] for p in peers_])
    base = "nbdkit-file"
    doc("Ratio to nbdkit's C `file` plugin on the same file, per round, median [min–max]:", "")
    ratio_rows = []
    ratios: dict[tuple[str, str], list[float]] = {}
    for p in peers_:
        cells = []
        for w in wl:
            ratios[(p["name"], w)] = steady_ratios(d, p["name"], base, w)
            cells.append(fmt_span(ratios[(p["name"], w)]))
        ratio_rows.append([p["label"]] + cells)
    doc.table(["peer"] + list(wl), ratio_rows)

    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(peers_))
    for i, p in enumerate(peers_):
        meds, lo, hi = [], [], []
        for w in wl:
            m, a, b = span(ratios[(p["name"], w)])
            meds.append(m)
            lo.append(m - a)
            hi.append(b - m)
        xs = [j + (i - len(peers_) / 2 + 0.5) * width for j in range(len(wl))]
        ax.bar(xs, meds, width, yerr=[lo, hi], label=p["label"], capsize=2)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(wl)), [wl[w] for w in wl])
    ax.set_ylabel("throughput / nbdkit file plugin (same round)")
    ax.set_title("Steady state: every peer against the C file plugin (median, min–max over rounds)")
    ax.legend(fontsize=7, ncol=2)
    doc.figure("steady_state.png", fig, "steady state")

    snap_n = f"snapdisk-{n}-{mode}"
    other = [m for m in d["thread_models"] if m != mode]
    # (what against, its peer name for a given thread model, goal): the default thread model is
    # the target; the other one's ratio goes in the note.
    comparisons = [
        ("Python passthrough (better mode)", lambda m: best_passthrough(d), 0.9),
        (f"qemu-nbd qcow2, {n} snapshots", lambda m: f"qemu-nbd-qcow2-{n}", 1.0),
        ("none", lambda m: f"snapdisk-0-{m}", 0.95),
    ]
    for against, peer_for, goal in comparisons:
        subject = "snapdisk live volume" if against == "none" else "snapdisk"
        for w in wl:
            note = ""
            if other:
                alt = steady_ratios(d, f"snapdisk-{n}-{other[0]}", peer_for(other[0]), w)
                note = f"threads={other[0]}: {fmt_span(alt)}"
            # issue 9 raises the 4 KiB random read goal against the passthrough to 1.0x
            lo = 1.0 if against.startswith("Python") and w == "randread" else goal
            targets.append(Target(f"{wl[w]}: {subject}, {n} snapshots / {against}",
                                  steady_ratios(d, snap_n, peer_for(mode), w), lo=lo, note=note))
    raw_w = [metric(r, "randwrite") for r in d["rows"]
             if r["peer"] == "raw-fio" and r["workload"] == "randwrite"]
    doc(f"The targets use snapdisk's default thread model (threads={mode}); the other model's "
        "figures are in the targets table's notes and in the tables above.  Every peer writes "
        "through the page cache into a file on the same ext4 filesystem (nothing is synced between "
        "peers; the kernel writes back as it likes), and 4 KiB random writes there are bounded near "
        f"what fio itself gets on the raw file: {fmt_span(raw_w, '{:,.0f}')} IOPS.  The 4 KiB random "
        "write ratios are therefore about that bound and noisy; the reads and 1 MiB writes show the "
        "servers themselves.", "")


# ---- 2. first writes after a snapshot ---------------------------------------------------------

def section_first_writes(doc: Doc, d: dict[str, Any], steady: dict[str, Any] | None,
                         targets: list[Target], volume_bytes: int) -> None:
    rows = d["rows"]
    writes, clusters = d["bytes"] / 4096, volume_bytes / (64 << 10)
    fresh = clusters / writes * (1 - math.exp(-writes / clusters)) if writes else 0.0
    by_peer = grouped(rows, "peer")
    doc("## 2. First writes after a snapshot", "",
        f"A snapshot, then {human_bytes(d['bytes'])} of 4 KiB random writes at QD16 (fio's random map: "
        "each block once) to blocks the snapshot shares.  snapdisk takes the snapshot through its "
        "control socket while serving; qcow2's is `qemu-img snapshot -c` on the closed image (qemu-nbd "
        "stopped, then restarted).  A new snapshot every round.  qcow2 copies the rest of each 64 KiB "
        "cluster on its first write; snapdisk redirects the 4 KiB and copies nothing.  With "
        f"{writes:,.0f} random writes over {clusters:,.0f} clusters, {fresh * 100:.0f} % of qcow2's writes "
        "land on a cluster not yet copied (and all of snapdisk's on a shared block).", "")
    table = []
    for p in d["peers"]:
        rs = by_peer[p["name"]]
        table.append([p["label"], fmt_span([r["snapshot_ms"] for r in rs], "{:.1f}", " ms"),
                      fmt_span([r["iops"] for r in rs], "{:,.0f}"),
                      fmt_span([r["lat_p99_us"] / 1000 for r in rs], "{:.2f}", " ms")])
    doc.table(["peer", "snapshot create", "4 KiB random write IOPS after it", "write latency p99"], table)
    sd, q = (p["name"] for p in d["peers"])
    idx = _by(rows, "round", "peer")
    ratios = [idx[(r, sd)]["iops"] / idx[(r, q)]["iops"] for r in sorted({x["round"] for x in rows})
              if (r, sd) in idx and (r, q) in idx]
    doc(f"snapdisk / qcow2, per round: {fmt_span(ratios)}x.", "")
    steady_ref: dict[str, list[float]] = {}
    if steady is not None:
        ref = {"snapdisk": f"snapdisk-0-{steady['default_threads']}", "qemu-nbd-qcow2": "qemu-nbd-qcow2-0"}
        for name, peer in ref.items():
            steady_ref[name] = [r["iops"] for r in steady["rows"]
                                if r["peer"] == peer and r["workload"] == "randwrite"]
        doc("For scale, the same workload in the steady state (scenario 1, no snapshot shares the "
            f"blocks): snapdisk {fmt_span(steady_ref['snapdisk'], '{:,.0f}')} IOPS, qcow2 "
            f"{fmt_span(steady_ref['qemu-nbd-qcow2'], '{:,.0f}')} IOPS.", "")
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [p["name"] for p in d["peers"]]
    labels = ["snapdisk", "qcow2 (qemu-nbd)"]
    m = [span(r["iops"] for r in by_peer[n])[0] for n in names]
    bars = ax.bar([0, 2], m, 0.8, label="right after a snapshot")
    ax.bar_label(bars, fmt="{:,.0f}")
    if steady_ref:
        bars = ax.bar([1, 3], [span(steady_ref[n])[0] for n in names], 0.8, label="steady state (scenario 1)")
        ax.bar_label(bars, fmt="{:,.0f}")
    ax.set_xticks([0.5, 2.5], labels)
    ax.set_ylabel("4 KiB random write IOPS, QD16 (median)")
    ax.margins(y=0.15)
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax.set_title("First writes after a snapshot")
    doc.figure("first_writes.png", fig, "first writes after a snapshot")
    inplace = [r["iops"] / r["inplace"]["iops"] for r in by_peer[sd] if r.get("inplace", {}).get("iops")]
    if inplace:
        doc("In place, the same volume: right after the first writes, the same blocks again in the same "
            "order (fio's `randseed`), now the volume's own: "
            f"{fmt_span([r['inplace']['iops'] for r in by_peer[sd] if 'inplace' in r], '{:,.0f}')} IOPS; "
            f"first writes / in place, per round: {fmt_span(inplace)}x.", "")
    for key, what in (("clone", "into a clone of the snapshot"),
                      ("rollback", "after a rollback of the volume to the snapshot")):
        got = [r for r in by_peer[sd] if r.get(key, {}).get("iops") and r.get("inplace")]
        if got:
            doc(f"The same first writes {what} (its blocks are SHARED: other records hold them "
                f"too): {fmt_span([r[key]['iops'] for r in got], '{:,.0f}')} IOPS, "
                f"{fmt_span([r[key]['iops'] / r['inplace']['iops'] for r in got])}x in place.", "")

    targets.append(Target("First 4 KiB random writes right after a snapshot / the in-place steady state "
                          "of the same volume (the same blocks rewritten)", inplace, lo=0.95))
    targets.append(Target("First 4 KiB random writes right after a snapshot: snapdisk / qcow2 (qemu-nbd)",
                          ratios, lo=10.0))


# ---- 7. the C core ------------------------------------------------------------------------------

def section_core(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    doc("## 7. The C core against its Python twin", "",
        "`python benchmarks/test_core_bench.py` (each rate the best of 5 timed batches; the same input "
        "for both; the last row is the whole 4 KiB read path, engine and LMDB included):", "",
        "```", d["stdout"].rstrip(), "```", "")
    rows = d["rows"]
    for r in rows:
        if "whole hot path" in r["routine"]:
            continue  # not a map routine: the pread both sides make bounds it (shown, not a target)
        targets.append(Target(f"C core / Python twin: {r['routine']}", [r["ratio"]], lo=10.0, fmt="{:.1f}"))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["routine"] for r in rows], [r["ratio"] for r in rows])
    ax.axvline(10, color="black", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("C ops/s / Python ops/s (log; dotted: the 10x target)")
    ax.invert_yaxis()
    ax.set_title("The C core against its Python twin")
    doc.figure("core.png", fig, "C core vs Python")
