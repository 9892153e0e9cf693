"""Scenario 11 of scripts/bench, disaster recovery (issue 13): `send | receive` of a whole
volume between two stores against `nbdcopy` between their exports (sendrecv_bench.py), and
backups to a real radosgw the run starts on loopback against plain boto3 moving the same bytes
(backup_bench.py).  Each part keeps its own stand-alone entry point; this module only runs both
in the suite (sizes: 1 GiB, --quick 64 MiB) and writes the report section."""

from __future__ import annotations

from typing import Any

from . import backup_bench, sendrecv_bench
from .report_base import Doc, Target, fmt_span


def scenario(lab: Any) -> dict[str, Any]:
    quick = lab.s.quick
    return {"sendrecv": sendrecv_bench.run(quick), "backup": backup_bench.run(quick)}


def section(doc: Doc, d: dict[str, Any], targets: list[Target]) -> None:
    mib = float(1 << 20)
    doc("## 11. Disaster recovery: send/receive and backups to S3", "")
    sr = d.get("sendrecv") or {}
    if sr:
        doc(f"A {sr['size_bytes'] / mib:.0f} MiB volume of random data, sent whole from one "
            "served store to another: `snapdisk send v@s | snapdisk receive` (two CLI "
            "processes, through both servers' control sockets) against `nbdcopy` from the "
            "snapshot's export into a volume of the other store; best of "
            f"{len(sr['runs_s']['sendrecv'])} runs each.", "")
        doc.table(["copy", "seconds", "MiB/s"],
                  [["send \\| receive", f"{sr['sendrecv_s']:.2f}", f"{sr['sendrecv_MiBps']:.0f}"],
                   ["nbdcopy between the exports", f"{sr['nbdcopy_s']:.2f}",
                    f"{sr['nbdcopy_MiBps']:.0f}"]], align="lrr")
        doc("")
        targets.append(Target("send \\| receive of a full volume / nbdcopy", [sr["ratio"]],
                              lo=1.0))
    bk = d.get("backup") or {}
    if bk.get("skipped"):
        doc(f"Backups: not measured ({bk['skipped']}).", "")
    elif bk:
        doc(f"A {bk['size_bytes'] / mib:.0f} MiB volume of random data backed up to a one-node "
            f"Ceph radosgw on loopback (memstore), {bk['threads']} threads; the baseline is "
            "plain boto3 putting and getting the same bytes as 1 MiB objects with as many "
            "threads.  Then 10 % of the blocks rewritten (scattered 4 KiB) and backed up "
            "incrementally; the full backup restored into a second store.", "")
        doc.table(["transfer", "snapdisk", "boto3", "ratio"], [
            ["full backup", f"{bk['full_MiB_s']:.0f} MiB/s",
             f"{bk['baseline_upload_MiB_s']:.0f} MiB/s", f"{bk['full_vs_boto3']:.2f}x"],
            ["restore", f"{bk['restore_MiB_s']:.0f} MiB/s",
             f"{bk['baseline_download_MiB_s']:.0f} MiB/s", f"{bk['restore_vs_boto3']:.2f}x"],
            ["incremental (10 % changed)", f"{bk['incremental_s']:.2f} s, "
             f"{bk['incremental_uploaded_bytes'] / mib:.1f} MiB up",
             f"{bk['changed_bytes'] / mib:.1f} MiB changed", "–"]], align="lrrr")
        doc("")
        cpu = bk.get("cpu_s") or {}
        if cpu:  # the two cores are shared with radosgw: client CPU is server time lost
            doc("CPU seconds of the benchmark process (all its threads; radosgw not counted): "
                f"full backup {cpu['full']:.2f} against boto3's upload "
                f"{cpu['baseline_upload']:.2f}, restore {cpu['restore']:.2f} (sha256 of every "
                f"chunk, the store's writes) against boto3's download "
                f"{cpu['baseline_download']:.2f}, incremental {cpu['incremental']:.2f}.", "")
        targets += [
            Target("Incremental backup: uploaded / changed bytes", [bk["incremental_upload_ratio"]],
                   hi=1.2000001),
            Target("Incremental backup time / full backup time", [bk["incremental_time_ratio"]],
                   hi=0.2000001),
            Target("Full backup / boto3 upload of the same bytes", [bk["full_vs_boto3"]], lo=0.8),
            Target("Restore / boto3 download of the same bytes", [bk["restore_vs_boto3"]], lo=0.8)]


__all__ = ["fmt_span", "scenario", "section"]
