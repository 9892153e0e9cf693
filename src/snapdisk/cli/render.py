"""Rendering for the command line: sizes (parsed and shown in binary units), times, aligned
tables, "key: value" blocks, and the one place a result is printed (JSON or text)."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from .. import errors

UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '4096', '512M', '10G', '1.5TiB' (units are binary: 1K = 1024; an optional
    'B' or 'iB' after the letter is accepted).  The result must be a whole number of bytes."""
    m = SIZE_RE.match(text)
    if not m:
        raise errors.InvalidSize(f"invalid size {text!r}: a number with an optional unit "
                                 "K, M, G, T, P or E (binary: 1K = 1024), e.g. 10G")
    number, unit = m.group(1), m.group(2).upper()
    scale = 1 << (10 * ("KMGTPE".index(unit) + 1)) if unit else 1
    whole, _, frac = number.partition(".")
    numerator = int(whole + frac) * scale
    denominator: int = 10 ** len(frac)  # int ** int is Any to mypy (a negative power is a float)
    if numerator % denominator:
        raise errors.InvalidSize(f"invalid size {text!r}: not a whole number of bytes")
    return numerator // denominator


def format_size(n: int | None) -> str:
    """'512 B', '4 KiB', '1.5 GiB': binary units, at most one decimal."""
    if n is None:
        return "-"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(UNITS) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.1f}".removesuffix(".0") if unit else str(n)
    return f"{text} {UNITS[unit]}"



def format_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: str = "") -> str:
    """An aligned plain-text table (rich, no borders: output a script can still split on
    whitespace); columns whose index is in `right` (as digits) align right.  Rendered at a
    fixed, wide width, never wrapped or cut to the terminal: a long name stays whole."""
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0),
              header_style="", highlight=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if str(i) in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*("-" if c is None else str(c) for c in r))
    console = Console(width=100_000, no_color=True, color_system=None, highlight=False,
                      emoji=False, markup=False, force_terminal=False, soft_wrap=True)
    with console.capture() as cap:
        console.print(t)
    return "\n".join(line.rstrip() for line in cap.get().rstrip("\n").split("\n"))


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {'-' if v is None else v}" for k, v in pairs)



def emit(a: argparse.Namespace, result: Any, text: str) -> None:
    """Print a command's result: the JSON document with --json, else its text (if any)."""
    if a.json:
        print(json.dumps(result, indent=2, default=str))
    elif text:
        print(text)
