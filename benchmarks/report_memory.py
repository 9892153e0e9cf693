"""Section 6 of the report: the server's memory while writing, and what LMDB's map pages cost."""

from __future__ import annotations

from typing import Any

from benchmarks.report_base import (
    GIB,
    MIB,
    Doc,
    Target,
    human_bytes,
    plt,
)

# ---- 6. RSS -------------------------------------------------------------------------------------

def section_rss(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    s = d["samples"]
    first, last = s[0][1], s[-1][1]
    doc("## 6. Server memory while writing", "",
        f"A fresh store, one {human_bytes(d['volume_bytes'])} volume; fio writes "
        f"{human_bytes(d['written_bytes'])} as random 4 KiB blocks (each once, QD16) in {d['seconds']:.0f} s "
        f"({d['fio']['iops']:,.0f} IOPS); the nbdkit process's memory sampled every 0.5 s.  VmRSS counts "
        "RssAnon (the process's own memory: Python, the plugin, the C core) and RssFile (file pages mapped "
        "into it: LMDB's read-only map of the metadata, page cache the kernel can reclaim).", "")
    doc.table(["", "VmRSS", "RssAnon", "RssFile"],
              [["at start"] + [human_bytes(first.get(k, 0)) for k in ("VmRSS", "RssAnon", "RssFile")],
               ["at end"] + [human_bytes(last.get(k, 0)) for k in ("VmRSS", "RssAnon", "RssFile")],
               ["max"] + [human_bytes(d["max"][k]) for k in ("VmRSS", "RssAnon", "RssFile")]])
    gib = d["written_bytes"] / GIB
    slope = (last.get("VmRSS", 0) - first.get("VmRSS", 0)) / MIB / gib if gib else 0.0
    reach = (200 - first.get("VmRSS", 0) / MIB) / slope if slope > 0 else float("inf")
    grown = last.get("VmRSS", 0) - first.get("VmRSS", 0)
    file_share = (last.get("RssFile", 0) - first.get("RssFile", 0)) / grown * 100 if grown > 0 else 0.0
    doc(f"VmRSS grew {slope:.1f} MiB per GiB written, {file_share:.0f} % of it RssFile (LMDB pages of "
        f"the growing map that this process touched); at that rate it would pass 200 MiB after about "
        f"{reach:,.0f} GiB of random 4 KiB writes, though the kernel may drop those file pages at any "
        f"time; RssAnon stayed at {human_bytes(last.get('RssAnon', 0))}.", "")
    targets.append(Target(f"server RSS (VmRSS max) writing {human_bytes(d['written_bytes'])} of random "
                          "4 KiB blocks", [d["max"]["VmRSS"] / MIB], hi=200,
                          fmt="{:.0f}", suffix=" MiB",
                          note=f"RssAnon max {human_bytes(d['max']['RssAnon'])}; RssFile grows "
                          f"{slope:.0f} MiB/GiB written (200 MiB at ~{reach:,.0f} GiB)"))
    section_rss_issue9(doc, d, targets)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k in ("VmRSS", "RssAnon", "RssFile"):
        ax.plot([t for t, _ in s], [x.get(k, 0) / MIB for _, x in s], label=k)
    ax.axhline(200, color="black", ls=":", lw=0.8, label="200 MiB target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"snapdisk server memory while fio writes {human_bytes(d['written_bytes'])} "
                 "of random 4 KiB blocks")
    doc.figure("rss.png", fig, "server RSS")


def section_rss_issue9(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    """Issue 9: RssAnon flat, and what the LMDB map pages cost and whether they are reclaimable."""
    s = d["samples"]
    size = human_bytes(d["written_bytes"])
    short = ("" if d["written_bytes"] >= 16 * GIB
             else f"run with {size}, not the issue's 16 GiB (setting rss_written)")
    half = min(s, key=lambda x: abs(x[0] - s[-1][0] / 2))[1].get("RssAnon", 0)
    end = s[-1][1].get("RssAnon", 0)
    targets.append(Target(f"Server memory after writing {size} of random 4 KiB blocks: RssAnon flat (at the "
                          "end / half-way)", [end / half] if half else [], hi=1.10,
                          note=f"{human_bytes(half)} half-way, {human_bytes(end)} at the end" +
                          (f"; {short}" if short else "")))
    before, after = d.get("maps_before"), d.get("maps_after")
    if not before:
        targets.append(Target(f"Server memory after writing {size}: LMDB map pages reclaimable", [],
                              lo=0.9, note="not measured by this run (no mapping of the store's files)"))
        return
    rows = [[f, human_bytes(v["Size"]), human_bytes(v["Rss"]), human_bytes(v["Dirty"]),
             human_bytes(after.get(f, {}).get("Rss", 0) if after else 0)] for f, v in sorted(before.items())]
    doc("What the store's file mappings cost at the end of the run (from /proc/PID/smaps: LMDB's map of "
        "the metadata), and what was left resident after `benchmarks/memory.py` asked the kernel to take "
        "them back from this process alone (fsync each file, then `process_madvise(MADV_PAGEOUT)` over "
        "its mappings: what memory pressure would do, without touching the rest of the machine):", "")
    doc.table(["file", "mapped", "resident", "of it dirty", "resident after fsync + pageout"], rows)
    res = sum(v["Rss"] for v in before.values())
    left = sum(v.get("Rss", 0) for v in (after or {}).values())
    rb, ra = d.get("rss_before_reclaim", {}), d.get("rss_after_reclaim", {})
    if d.get("reclaim_error"):
        doc(f"The pageout could not be measured: {d['reclaim_error']}.", "")
    else:
        doc(f"VmRSS {human_bytes(rb.get('VmRSS', 0))} → {human_bytes(ra.get('VmRSS', 0))}, RssFile "
            f"{human_bytes(rb.get('RssFile', 0))} → {human_bytes(ra.get('RssFile', 0))}, RssAnon "
            f"{human_bytes(rb.get('RssAnon', 0))} → {human_bytes(ra.get('RssAnon', 0))}.", "")
    targets.append(Target(f"Server memory after writing {size}: LMDB map pages reclaimable (share of the "
                          "resident map pages the kernel took back on request)",
                          [] if d.get("reclaim_error") or not res else [1 - left / res], lo=0.9,
                          note=f"map pages resident {human_bytes(res)} ({human_bytes(d['written_bytes'])} "
                          f"written), {human_bytes(left)} after" + (f"; {short}" if short else "")))
