"""The parser kit every command module uses: the global options (--store, --json, accepted
before or after the command), one helper that adds a command with its description, examples
and the exit-code table, and the argument types (sizes, VOLUME@SNAPSHOT)."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

from .. import errors
from .context import Context, Result
from .render import parse_size

DEFAULT_STORE = "/var/lib/snapdisk"
EXIT_INTERRUPTED = 130


def split_ref(text: str, need_snapshot: bool = True) -> tuple[str, str | None]:
    """'VOL@SNAP' -> ('VOL', 'SNAP'), checked by snapdisk.exportspec (names, ids in range)."""
    from ..exportspec import ExportSpec
    spec = ExportSpec.parse(text, snapshot=True if need_snapshot else None)
    return spec.volume, spec.snapshot


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except errors.InvalidSize as e:
        raise argparse.ArgumentTypeError(e.message) from None


def exit_codes_text() -> str:
    """The exit-code table, built from errors.py (docs/cli.md shows the same table)."""
    by_code: dict[int, list[str]] = {0: ["success"]}
    for cls in errors.ALL.values():
        by_code.setdefault(cls.exit_code, []).append(cls.code)
    by_code.setdefault(2, []).insert(0, "usage")
    by_code.setdefault(EXIT_INTERRUPTED, []).append("interrupted (Ctrl-C)")
    lines = ["exit codes:"]
    lines += [f"  {code:<4} {', '.join(dict.fromkeys(names))}" for code, names in sorted(by_code.items())]
    return "\n".join(lines)


STORE_HELP = (f"the store directory (default: $SNAPDISK_STORE, else {DEFAULT_STORE})")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def add_globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--store and --json, accepted before or after the command (subcommands SUPPRESS their
    defaults so that they do not overwrite a value given before the command)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--store", metavar="DIR", default=default, help=STORE_HELP)
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="print machine-readable JSON instead of tables")


def add_command(sub: Any, name: str, func: Callable[[argparse.Namespace, Context], Result],
             summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, formatter_class=Formatter,
        description=summary + "\n\n" + textwrap.dedent(description).strip(),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")
        + "\n\n" + exit_codes_text())
    add_globals(p, suppress=True)
    p.set_defaults(func=func)
    return p


def add_group(sub: Any, name: str, summary: str) -> Any:
    p = sub.add_parser(name, help=summary, description=summary, formatter_class=Formatter)
    return p.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
