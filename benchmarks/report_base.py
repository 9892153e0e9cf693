"""The report's building blocks: numbers over rounds, targets (PASS/MISS), the markdown document.

Every figure is a median over rounds with its min..max spread; a ratio between two peers is
computed per round (both measured in that round, back to back) and then summarised, so that a
slow minute on the shared machine moves numerator and denominator together.  The targets table
says PASS or MISS for each number the benchmark issue asks for, and by how much.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
SEQ = ("seqread", "seqwrite")


# ---- numbers --------------------------------------------------------------------------------

def span(xs: Iterable[float]) -> tuple[float, float, float]:
    v = [x for x in xs if x is not None]
    if not v:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(v), min(v), max(v)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    v = sorted(xs)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def fmt_span(xs: Iterable[float], fmt: str = "{:.2f}", unit: str = "") -> str:
    m, lo, hi = span(xs)
    if m != m:  # nan
        return "–"
    if lo == hi:
        return fmt.format(m) + unit
    return f"{fmt.format(m)}{unit} [{fmt.format(lo)}–{fmt.format(hi)}]"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def metric(row: dict[str, Any], workload: str) -> float:
    """What a workload is judged by: IOPS for 4 KiB, MiB/s for 1 MiB."""
    return float(row["bw_bytes"]) / MIB if workload in SEQ else float(row["iops"])


def unit(workload: str) -> str:
    return "MiB/s" if workload in SEQ else "IOPS"


@dataclass
class Target:
    """A number to reach: PASS when the median lies in [lo, hi] (either bound may be open)."""

    what: str
    values: list[float]  # per round (or the single measurement)
    lo: float | None = None
    hi: float | None = None
    fmt: str = "{:.2f}"
    suffix: str = "x"
    note: str = ""

    @property
    def median(self) -> float:
        return span(self.values)[0]

    @property
    def ok(self) -> bool | None:
        m = self.median
        if m != m:
            return None
        return (self.lo is None or m >= self.lo) and (self.hi is None or m < self.hi)

    def goal_text(self) -> str:
        f = self.fmt
        if self.lo is not None and self.hi is not None:
            return f"{f.format(self.lo)}–{f.format(self.hi)}{self.suffix}"
        if self.lo is not None:
            return f"≥ {f.format(self.lo)}{self.suffix}"
        return f"< {f.format(self.hi)}{self.suffix}"

    def verdict(self) -> str:
        m = self.median
        ok = self.ok
        if ok is None:
            return "not measured"
        if self.lo is not None and m < self.lo:
            return (f"**MISS** ({(1 - m / self.lo) * 100:.0f} % short: needs {self.lo / m:.2f}x)" if m > 0
                    else "**MISS** (zero)")
        if self.hi is not None and m >= self.hi:
            return f"**MISS** ({(m / self.hi - 1) * 100:.0f} % over: needs {m / self.hi:.2f}x less)"
        if self.lo is not None and self.hi is None:
            return f"**PASS** ({(m / self.lo - 1) * 100:.0f} % above)"
        if self.hi is not None and self.lo is None:
            return f"**PASS** ({(1 - m / self.hi) * 100:.0f} % under)"
        return "**PASS**"


# ---- the document -----------------------------------------------------------------------------

class Doc:
    def __init__(self, out: str) -> None:
        self.out = out
        self.lines: list[str] = []

    def __call__(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, head: list[str], rows: list[list[str]], align: str | None = None) -> None:
        self.lines.append("| " + " | ".join(head) + " |")
        self.lines.append("|" + "|".join((align or "l" + "r" * (len(head) - 1))[i].replace("l", "---")
                                          .replace("r", "---:") for i in range(len(head))) + "|")
        for r in rows:
            self.lines.append("| " + " | ".join(r) + " |")
        self.lines.append("")

    def figure(self, name: str, fig: Any, caption: str) -> None:
        path = os.path.join(self.out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.lines += [f"![{caption}]({name})", ""]

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def _by(rows: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r[k] for k in keys): r for r in rows}


def grouped(rows: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """rows by their value of key, in first-seen order."""
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r[key]].append(r)
    return out
