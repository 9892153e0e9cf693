"""Issue 11's benchmark rows on made-up results (no server, no fio): the encrypted/plain ratios
are taken per round (IOPS for 4 KiB, bytes/s for 1 MiB), judged against 0.90x and 0.80x, and
the snapshot copy figures are MiB/s of the snapshot's allocated bytes; `encryption` is a
scenario of scripts/bench and its section is in the report."""

from __future__ import annotations

import pytest

from benchmarks import encryption, report, run, scenarios
from benchmarks.report_base import Doc, Target

MiB = 1 << 20


def rows(ratio_4k: float, ratio_seq: float) -> list[dict[str, float | int | str]]:
    out: list[dict[str, float | int | str]] = []
    for r in range(3):
        for name in encryption.TARGETS:
            seq = name.startswith("seq")
            out.append({"round": r, "workload": name, "plain_iops": 1000.0,
                        "plain_bw_bytes": 100.0 * MiB,
                        # the metric not judged is off on purpose: it must not be used
                        "enc_iops": 1000.0 * (0.1 if seq else ratio_4k),
                        "enc_bw_bytes": 100.0 * MiB * (ratio_seq if seq else 0.1)})
    return out


def test_ratios_and_verdicts(tmp_path: object) -> None:
    d = {"size": 64 * MiB, "seconds": 3.0, "rounds": 3, "rows": rows(0.92, 0.78),
         "copy_bytes": 64 * MiB, "copies": [{"round": 0, "encrypt_s": 0.5, "nbdcopy_s": 1.0}]}
    doc, targets = Doc(str(tmp_path)), []  # type: ignore[var-annotated]
    encryption.section(doc, d, targets)
    by = {t.what.split(": ", 1)[1]: t for t in targets}
    assert all(isinstance(t, Target) for t in targets) and len(targets) == 4
    assert by["4 KiB random read, QD16"].median == pytest.approx(0.92)
    assert by["4 KiB random read, QD16"].ok and by["4 KiB random write, QD16"].ok
    assert by["1 MiB sequential read, QD4"].median == pytest.approx(0.78)
    assert not by["1 MiB sequential write, QD4"].ok  # 0.78 < 0.80: MISS
    text = doc.text()
    assert "## 10. Encrypted volumes" in text
    assert "| 128 |" in text and "| 64 |" in text  # 64 MiB in 0.5 s and in 1.0 s


def test_registered_in_scripts_bench() -> None:
    assert run.selected("encryption") == ["encryption"]
    assert scenarios.SCENARIOS["encryption"] is encryption.scenario
    from pathlib import Path
    assert "section_encryption" in Path(report.__file__).read_text()  # report.build calls it
