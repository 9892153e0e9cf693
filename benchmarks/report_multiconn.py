"""Section 8 of the report: 4 KiB random I/O over 1, 2 and 4 connections (benchmarks/multiconn.py).

Per round and workload: IOPS at each connection count, the scaling ratio (most connections /
one, per round), the CPU each side used, and two passthrough processes against one.  The text
that says what limits scaling is computed from the CPU figures, not written in advance: a peer is
"held at one core" when its process uses about one core while the machine has a core to spare,
"machine-bound" when the machine's cores are (nearly) all busy.
"""

from __future__ import annotations

from typing import Any

from benchmarks.report_base import Doc, fmt_span, plt, span

WL = {"randread": "4 KiB random read", "randwrite": "4 KiB random write"}


def _vals(rows: list[dict[str, Any]], key: str, **match: Any) -> list[float]:
    return [r[key] for r in rows if all(r[k] == v for k, v in match.items()) and r.get(key) is not None]


def scaling(rows: list[dict[str, Any]], peer: str, w: str, hi: int, lo: int = 1,
            den_peer: str | None = None) -> list[float]:
    """Per round: IOPS of peer at hi connections / IOPS of den_peer (default: peer) at lo."""
    idx = {(r["round"], r["workload"], r["peer"], r["conns"]): r["iops"] for r in rows}
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        a, b = idx.get((rnd, w, peer, hi)), idx.get((rnd, w, den_peer or peer, lo))
        if a is not None and b:
            out.append(a / b)
    return out


def limit_text(rows: list[dict[str, Any]], peer: str, w: str, conns: int, ncpu: int) -> str:
    """What the CPU figures say holds peer back at conns connections."""
    def med(key: str) -> float:
        return span(_vals(rows, key, peer=peer, workload=w, conns=conns))[0]
    server, user, machine = med("server_cores"), med("server_user_cores"), med("machine_cores")
    other, fio_c, hot = med("other_cores"), med("fio_cores"), med("hot_thread_cores")
    if server != server:
        return "not measured"
    if user != user:  # results from before the user/sys split
        user = server
    figures = (f"server {server:.2f} cores ({user:.2f} user, busiest thread {hot:.2f}), fio {fio_c:.2f}, "
               f"the rest {other:.2f}, machine {machine:.2f} of {ncpu}")
    if user >= 0.85:
        what = ("interpreter-bound: the server's user time sits at about one core, all one GIL lets "
                "Python run, whatever the connections")
    elif machine >= 0.9 * ncpu and other >= 0.25 * ncpu:
        what = ("the machine was full, much of it neither server nor fio (kernel threads such as "
                "writeback, other jobs on this shared machine): these IOPS are a floor")
    elif machine >= 0.9 * ncpu:
        what = "machine-bound: server, fio and the kernel fill every core"
    else:
        what = ("neither one core of interpreter nor the whole machine is full: the limit is elsewhere "
                "(round trips through the socket, requests in flight per connection)")
    return f"{what}; {figures}"


def section_multiconn(doc: Doc, d: dict[str, Any]) -> None:
    rows, conns, ncpu = d["rows"], d["conns"], d.get("ncpu") or 2
    single = [p for p in d["peers"] if any(r["peer"] == p["name"] and r["procs"] == 1 for r in rows)]
    most = max(conns)
    ramp = f" after {d['ramp_s']} s of ramp" if d.get("ramp_s") else ""
    doc("## 8. More than one connection", "",
        f"fio `--numjobs=N` with the nbd engine: N jobs, each its own NBD connection (multi-conn), QD"
        f"{d['iodepth']} each, reported as one group; each run {d['seconds']} s{ramp}, every configuration "
        "once per workload per round, the order rotated each round; all servers on scenario 1's data "
        "(the raw file; snapdisk's 0-snapshot store).  The Python passthrough runs with nbdkit's "
        "SERIALIZE_REQUESTS thread model, snapdisk's own (one request at a time per connection, "
        "connections in parallel); the C plugin is fully parallel.  Around each run the CPU time of "
        f"each side is measured (below); the machine has {ncpu} cores.  IOPS, median [min–max] over "
        "rounds:", "")
    table = []
    for p in single:
        for w in WL:
            cells = [fmt_span(_vals(rows, "iops", peer=p["name"], workload=w, conns=c), "{:,.0f}")
                     for c in conns]
            table.append([p["label"], WL[w], *cells,
                          fmt_span(scaling(rows, p["name"], w, most)) + "x"])
    doc.table(["peer", "workload", *[f"{c} conn{'s' if c > 1 else ''}" for c in conns],
               f"{most} / 1 (per round)"], table, align="ll" + "r" * (len(conns) + 1))

    doc("CPU per run, median [min–max] over rounds, in cores (CPU seconds / wall seconds): the server "
        "(all threads; user time is where nbdkit's one embedded interpreter runs, under its one GIL, so "
        "at most about 1.0 of it can be Python), its busiest thread (sampled during the run), fio, the "
        "rest of the machine (kernel threads such as the page cache's writeback, and other jobs on "
        "this shared machine), the whole machine; and the server's CPU time per "
        "request (CPU seconds / requests served):", "")
    cpu_rows = []
    for p in d["peers"]:
        for w in WL:
            for c in conns:
                m = dict(peer=p["name"], workload=w, conns=c)
                if not _vals(rows, "iops", **m):
                    continue
                cpu_rows.append([p["label"], WL[w], str(c)] + [
                    fmt_span(_vals(rows, k, **m)) for k in
                    ("server_cores", "server_user_cores", "hot_thread_cores", "fio_cores", "other_cores",
                     "machine_cores", "server_cpu_us_per_io")])
    doc.table(["peer", "workload", "conns", "server cores", "of it user", "busiest thread", "fio cores",
               "the rest", "machine cores", "server CPU µs / request"], cpu_rows,
              align="lll" + "r" * 7)

    doc(f"What limits scaling, read from those figures at {most} connections:", "")
    for p in single:
        for w in WL:
            doc(f"- {p['label']}, {WL[w]}: {limit_text(rows, p['name'], w, most, ncpu)}.")
    doc("")
    two = [p for p in d["peers"] if any(r["peer"] == p["name"] and r["procs"] == 2 for r in rows)]
    if two:
        tname = two[0]["name"]
        one = next((p["name"] for p in single if p["name"].startswith("passthrough")), None)
        for w in WL:
            ratio = scaling(rows, tname, w, most, most, den_peer=one) if one else []
            doc(f"- Two passthrough processes ({most // 2} connections each) / one process ({most} "
                f"connections), {WL[w]}: {fmt_span(ratio)}x per round; "
                f"{limit_text(rows, tname, w, most, ncpu)}.")
        doc("", "Two processes have two interpreters and two GILs: that ratio bounds what serving one "
            "store from several server processes (each with its own LMDB environment handle over the "
            "same files, LMDB's multi-process mode) could gain on this machine, before any cost of "
            "sharing the map between them.", "")

    fig, axes = plt.subplots(1, len(WL), figsize=(12, 4.5))
    for ax, w in zip(axes, WL, strict=True):
        for p in single:
            med = [span(_vals(rows, "iops", peer=p["name"], workload=w, conns=c))[0] for c in conns]
            ax.plot(conns, med, "o-", label=p["label"])
        for p in two:
            v = span(_vals(rows, "iops", peer=p["name"], workload=w, conns=most))[0]
            ax.plot([most], [v], "s", markersize=9, label=p["label"])
        ax.set_xticks(conns)
        ax.set_xlabel("NBD connections (fio numjobs)")
        ax.set_ylabel("IOPS (median over rounds)")
        ax.set_ylim(bottom=0)
        ax.set_title(WL[w])
        ax.legend(fontsize=7)
    doc.figure("multi_conn.png", fig, "more than one connection")

