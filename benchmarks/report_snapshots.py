"""Sections 3 (a snapshot every second), 4 (snapshot latency) and 5 (rollback and delete) of the report."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from benchmarks.report_base import (
    GIB,
    Doc,
    Target,
    fmt_span,
    grouped,
    human_bytes,
    pct,
    plt,
    span,
)

# ---- 3. a snapshot every second -----------------------------------------------------------------

def worst_after_snapshot(r: dict[str, Any], window_s: float = 0.25) -> float | None:
    """The worst window of fio's log (each stamped at its end) overlapping [t, t + window_s] after
    a snapshot started at t, over the run's snapshots, / the median window without snapshots."""
    base = statistics.median([v for _, v in r["none_log"]]) if r["none_log"] else 0
    hit = [v for t, _ in r["snapshots"] for e, v in r["snap_log"] if t < e < t + 2 * window_s]
    return min(hit) / base if base and hit else None


def section_live(doc: Doc, d: dict[str, Any], targets: list[Target]) -> list[float]:
    rows = d["rows"]
    doc("## 3. A snapshot every second while fio runs", "",
        f"4 KiB random writes, QD16, over the first {human_bytes(d['region_bytes'])} of the volume, "
        f"{d['seconds']:.0f} s without snapshots, then {d['seconds']:.0f} s with one snapshot a second "
        "(snapdisk: `snapshot.create` over one control-socket connection; qemu-storage-daemon: QMP "
        "`blockdev-snapshot-internal-sync` on the same qcow2 as scenario 2).  Before each pair the region "
        "is rewritten sequentially, so the run without snapshots writes in place (qcow2: clusters with "
        "refcount 1) and the one with snapshots pays for each snapshot and for the redirected (qcow2: "
        "copied) writes after it.  The snapshots are deleted after each round (not timed into the runs).",
        "")
    table = []
    sd_lat: list[float] = []
    by = grouped(rows, "peer")
    for p in d["peers"]:
        rs = by[p["name"]]
        ratios = [r["snap"]["iops"] / r["none"]["iops"] for r in rs if r["none"]["iops"]]
        dips = []
        for r in rs:
            base = statistics.median([v for _, v in r["none_log"]]) if r["none_log"] else 0
            if base and r["snap_log"]:
                dips.append(min(v for _, v in r["snap_log"]) / base)
        lat = [s * 1000 for r in rs for _, s in r["snapshots"]]
        dele = [s * 1000 for r in rs for s in r["delete_s"]]
        after = [x for x in (worst_after_snapshot(r) for r in rs) if x is not None]
        if p["name"] == "snapdisk":
            sd_lat = lat
            targets.append(Target("A snapshot every second under 4 KiB random writes: throughput / with none",
                                  ratios, lo=0.97))
            targets.append(Target("A snapshot every second: worst 250 ms after a snapshot / median 250 ms "
                                  "without", after, lo=0.80, note=f"worst 250 ms anywhere: {fmt_span(dips)}"))
        table.append([p["label"], fmt_span([r["none"]["iops"] for r in rs], "{:,.0f}"),
                      fmt_span([r["snap"]["iops"] for r in rs], "{:,.0f}"), fmt_span(ratios),
                      fmt_span(dips), fmt_span(after), f"{len(lat)}", f"{pct(lat, 50):.2f} / "
                      f"{pct(lat, 99):.2f} / {max(lat) if lat else float('nan'):.2f}",
                      fmt_span(dele, "{:.1f}")])
    doc.table(["peer", "IOPS, no snapshots", "IOPS, a snapshot a second", "ratio", "dip (worst 250 ms / "
               "median without)", "worst 250 ms after a snapshot / median without", "snapshots",
               "create ms p50 / p99 / max", "delete ms"], table)
    doc("The worst 250 ms after a snapshot: fio's 250 ms windows are not aligned with the snapshots, so "
        "for each snapshot both windows that overlap the first 250 ms after its start count, and the "
        "worst of them over the run is divided by the median window of the run without snapshots.", "")
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colors = {"snapdisk": "tab:blue", "qsd-qcow2": "tab:red"}
    for p in d["peers"]:
        rs = by[p["name"]]
        if not rs:
            continue
        r = rs[-1]
        c = colors.get(p["name"])
        for key, style, what in (("none_log", "--", "no snapshots"),
                                 ("snap_log", "-", "a snapshot a second")):
            log = r[key]
            if log:
                t0 = log[0][0]
                ax.plot([t - t0 for t, _ in log], [v for _, v in log], style, color=c,
                        label=f"{p['label'].split(',')[0]}: {what}")
        if r["snap_log"]:
            t0 = r["snap_log"][0][0]
            for t, _ in r["snapshots"]:
                ax.axvline(t - t0, color=c, alpha=0.25, lw=0.8)
    ax.set_xlabel("seconds since fio started (last round; vertical lines: snapshots)")
    ax.set_ylabel("4 KiB random write IOPS (250 ms windows)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Throughput over time with a snapshot every second: snapdisk vs qemu-storage-daemon (qcow2)")
    doc.figure("live_snapshots.png", fig, "a snapshot every second")
    return sd_lat


# ---- 4. snapshot latency vs data written --------------------------------------------------------

def section_latency(doc: Doc, d: dict[str, Any], live: dict[str, Any] | None, live_lat: list[float],
                    targets: list[Target]) -> None:
    rows = d["rows"]

    def region_of(r: dict[str, Any]) -> int:  # rows before the same-load runs have none: written
        return int(r.get("region_bytes", r["written_bytes"]))
    by: dict[tuple[int, int], list[float]] = defaultdict(list)  # by (written, region)
    for r in rows:
        by[(r["written_bytes"], region_of(r))] += [s * 1000 for s in r["latency_s"]]
    sizes = sorted({w for w, _ in by})
    small, big = sizes[0], sizes[-1]
    own = {w: by[(w, w)] for w in sizes}  # each volume under writes over its written part
    same = by.get((big, small))  # the big one under the small one's load
    doc("## 4. Snapshot latency with little and much data written", "",
        f"Two volumes of one store: {human_bytes(small)} written and {human_bytes(big)} written.  While "
        f"fio writes 4 KiB blocks at random (QD16) over the written part, a snapshot every "
        f"{d['interval_s']} s through the control socket; alternating volumes, rounds rotated."
        + (f"  The {human_bytes(big)} volume also runs under the {human_bytes(small)} volume's load "
           f"(fio over its first {human_bytes(small)}), so the two are compared with only what they "
           "hold differing: over its whole written part every write after a snapshot is a redirect, "
           "and a snapshot waits for a batch of far more of them." if same else ""), "")
    table = []
    for (w, region), lat in sorted(by.items()):
        table.append([human_bytes(w), human_bytes(region), str(len(lat)), f"{pct(lat, 50):.2f}",
                      f"{pct(lat, 99):.2f}", f"{max(lat) if lat else float('nan'):.2f}"])
    doc.table(["written", "fio writes over", "snapshots", "p50 ms", "p99 ms", "max ms"], table)

    def ratio(q: int, num: list[float]) -> float:
        return pct(num, q) / pct(own[small], q) if own[small] and num else float("nan")
    own50, own99 = ratio(50, own[big]), ratio(99, own[big])
    doc(f"{human_bytes(big)} / {human_bytes(small)}, each under writes over its written part: "
        f"p50 {own50:.2f}x, p99 {own99:.2f}x"
        + (f"; under the same load: p50 {ratio(50, same):.2f}x, p99 {ratio(99, same):.2f}x."
           if same else "."), "")
    all_lat = live_lat + [x for v in own.values() for x in v]  # the p99 target's load
    own_rows = [r for r in rows if region_of(r) == r["written_bytes"]]
    phases = {k: [x for r in own_rows + [r for r in (live or {}).get("rows", []) if r["peer"] == "snapdisk"]
                  for x in r.get(k, [])] for k in ("gate_wait_ms", "commit_ms", "batch_wait_ms",
                                                   "sync_ms")}
    # the floor: one page msync()ed + one fdatasync beside the snapshots, under the same load
    floor = [x * 1000 for r in own_rows for x in r.get("floor_s", [])]
    if floor:
        phases["floor_msync_fdatasync_ms"] = floor
    if any(phases.values()):
        doc("The server's own timing of each snapshot (`snapshot.create`'s reply, scenarios 3 and 4): "
            f"total p50 / p99 {pct(all_lat, 50):.2f} / {pct(all_lat, 99):.2f} ms (client side); "
            + "; ".join(f"{k} p50 / p99 / max {pct(v, 50):.2f} / {pct(v, 99):.2f} / {max(v):.2f} ms "
                        f"({len(v)} snapshots)" for k, v in phases.items() if v) + ".", "")
    else:
        doc("The server does not report its own timing of a snapshot (no `gate_wait_ms` / `commit_ms` in "
            "`snapshot.create`'s reply), so only the client's total is shown.", "")
    note = "; ".join(f"{k} p99 {pct(v, 99):.2f} ms" for k, v in phases.items() if v)
    what = f"({len(all_lat)} snapshots of scenarios 3 and 4, control socket)"
    targets.append(Target(f"Snapshot create under fio load: p99 {what}", [pct(all_lat, 99)], hi=5.0,
                          suffix=" ms", note=note))
    worst = max(all_lat) if all_lat else float("nan")
    targets.append(Target(f"Snapshot create under fio load: max {what}", [worst], hi=20.0, suffix=" ms"))
    if same:
        targets.append(Target(f"snapshot create p50, {human_bytes(big)} written / {human_bytes(small)} "
                              f"written, the same load (fio over {human_bytes(small)} of each)",
                              [ratio(50, same)], hi=1.5,
                              note=f"p99 ratio {ratio(99, same):.2f}x; each under writes over its "
                                   f"written part: p50 {own50:.2f}x, p99 {own99:.2f}x"))
    else:
        targets.append(Target(f"snapshot create p50, {human_bytes(big)} written / "
                              f"{human_bytes(small)} written",
                              [own50], hi=1.5, note=f"p99 ratio {own99:.2f}x"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [(f"snapdisk, {human_bytes(w)} written, fio over {human_bytes(r)} (sc. 4)", lat)
              for (w, r), lat in sorted(by.items())]
    if live is not None:
        for p in live["peers"]:
            lat = [s * 1000 for r in live["rows"] if r["peer"] == p["name"] for _, s in r["snapshots"]]
            series.append((f"{p['label'].split(',')[0]}, a snapshot a second (sc. 3)", lat))
    for label, lat in series:
        if lat:
            v = sorted(lat)
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=label)
    ax.axvline(5, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("snapshot create latency, ms (log; dotted: the 5 ms p99 target)")
    ax.set_ylabel("fraction of snapshots")
    ax.legend(fontsize=8)
    ax.set_title("Snapshot create latency under fio load (CDF)")
    doc.figure("snapshot_latency.png", fig, "snapshot latency")


# ---- 5. rollback and delete ---------------------------------------------------------------------

def section_rollback(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    rows = d["rows"]
    by = grouped(rows, "fraction")
    doc("## 5. Rollback and snapshot delete against the data changed", "",
        f"A fresh {human_bytes(d['volume_bytes'])} volume written in full.  For each fraction, each round: "
        "snapshot *a*, change that fraction of the volume (distinct random 4 KiB blocks), delete *a* (it "
        "owns exactly the changed blocks) while fio reads 4 KiB blocks at random (QD16; the walk paces "
        "itself while requests are served, src/snapdisk/bulk_pace.py); then snapshot *c*, change the same "
        "amount, delete *c* with no client I/O (the walk's own cost); then snapshot *b*, change the same "
        "amount again, roll back to *b* (no client connected, as rollback requires), and delete *b*.", "")
    table = []
    for f in sorted(by):
        rs = by[f]
        gib = rs[0]["changed_bytes"] / GIB
        table.append([f"{f * 100:g} %", human_bytes(rs[0]["changed_bytes"]),
                      fmt_span([r["rollback_s"] * 1000 for r in rs], "{:,.0f}"),
                      fmt_span([r["rollback_s"] / gib for r in rs], "{:.2f}"),
                      fmt_span([r["delete_s"] * 1000 for r in rs], "{:,.0f}"),
                      fmt_span([r["delete_s"] / gib for r in rs], "{:.2f}"),
                      fmt_span([r["delete_idle_s"] / gib for r in rs if "delete_idle_s" in r], "{:.2f}"),
                      fmt_span([r["iops_before_delete"] for r in rs], "{:,.0f}"),
                      fmt_span([r["iops_during_delete"] for r in rs], "{:,.0f}"),
                      fmt_span([r["delete_after_rollback_s"] * 1000 for r in rs], "{:,.0f}")])
    doc.table(["changed", "bytes", "rollback ms", "rollback s/GiB", "delete ms (under reads)",
               "delete s/GiB (under reads)", "delete s/GiB (idle)",
               "read IOPS before delete", "read IOPS during delete", "delete b after rollback ms"], table)
    fr = sorted(by)
    if len(fr) >= 2:
        lo, hi = fr[-2], fr[-1]
        idx_lo = {r["round"]: r for r in by[lo]}
        ratios = [r["rollback_s"] / idx_lo[r["round"]]["rollback_s"] for r in by[hi]
                  if r["round"] in idx_lo and idx_lo[r["round"]]["rollback_s"] > 0]
        ideal = hi / lo
        per_gib = [(r["rollback_s"] / r["changed_bytes"]) / (idx_lo[r["round"]]["rollback_s"]
                   / idx_lo[r["round"]]["changed_bytes"]) for r in by[hi] if r["round"] in idx_lo]
        doc(f"Rollback time {hi * 100:g} % / {lo * 100:g} %: {fmt_span(ratios)}x (proportional would be "
            f"{ideal:g}x).", "")
        targets.append(Target(f"rollback time proportional to changed data: time per changed GiB at "
                              f"{hi * 100:g} % / at {lo * 100:g} % (1.0 = proportional)", per_gib,
                              lo=0.5, hi=2.0, note=f"t({hi * 100:g} %)/t({lo * 100:g} %) = "
                              f"{fmt_span(ratios)}x, ideal {ideal:g}x"))
    if fr:  # issue 9: per changed GiB at the largest fraction (the least fixed overhead)
        big = by[fr[-1]]
        what = f"{human_bytes(big[0]['changed_bytes'])} of scattered 4 KiB blocks changed"
        loaded = fmt_span([r["delete_s"] / (r["changed_bytes"] / GIB) for r in big], "{:.2f}")
        for key, name, note in (
                ("delete_idle_s", "Snapshot delete",
                 f"goal ≤ 1 s per changed GiB; under fio reads (paced): {loaded} s/GiB"),
                ("rollback_s", "Rollback", "goal ≤ 1 s per changed GiB")):
            vals = [r[key] / (r["changed_bytes"] / GIB) for r in big if key in r]
            if vals:
                targets.append(Target(f"{name}: seconds per changed GiB ({what})", vals, hi=1.0,
                                      suffix=" s/GiB", note=note))
        during = [r["iops_during_delete"] / r["iops_before_delete"] for r in big
                  if r["iops_during_delete"] is not None and r["iops_before_delete"]]
        targets.append(Target(f"4 KiB random read IOPS while a snapshot delete runs / before it ({what})",
                              during, lo=0.9))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, color in (("rollback_s", "rollback", "tab:blue"),
                              ("delete_s", "snapshot delete (under fio reads)", "tab:red")):
        xs = [r["changed_bytes"] / GIB for r in rows]
        a1.plot(xs, [r[key] for r in rows], "o", alpha=0.5, color=color)
        med = [(by[f][0]["changed_bytes"] / GIB, span(r[key] for r in by[f])[0]) for f in fr]
        a1.plot([x for x, _ in med], [y for _, y in med], "-", label=label + " (median; dots: rounds)",
                color=color)
    a1.set_xlabel("data changed since the snapshot, GiB")
    a1.set_ylabel("seconds")
    a1.legend()
    a1.set_title("Rollback and delete time vs data changed")
    if fr:
        r = by[fr[-1]][-1]
        log = r["delete_log"]
        a2.plot([t for t, _ in log], [v for _, v in log], "-")
        a2.axvspan(0, r["delete_s"], color="tab:red", alpha=0.2, label="snapshot delete running")
        a2.set_xlabel("seconds from the delete's start")
        a2.set_ylabel("4 KiB random read IOPS (100 ms windows)")
        a2.set_ylim(bottom=0)
        a2.legend()
        a2.set_title(f"I/O during the delete of a snapshot owning {human_bytes(r['changed_bytes'])}")
    doc.figure("rollback_delete.png", fig, "rollback and delete")
