"""What names an export, or a snapshot on the command line: one parser for the plugin, the CLI
and attach.

    VOLUME              the live volume
    VOLUME@SNAPSHOT     a snapshot, by name or by id (ASCII digits, 0 .. 2**64-1)
    VOLUME@A..B         what changed between snapshots A and B: parsed, refused for now
                        (errors.Unsupported) until changed-block exports exist

Every part is checked by a full match (a trailing newline is not a name), so that what the
engine is handed is a name it could have made or an id that fits its u64 keys.  The name rule
is the catalog's (volume.NAME_RE: 1-64 ASCII letters, digits, '.', '_' or '-', starting with a
letter or digit), repeated here so that this module imports nothing but errors (the nbdkit
plugin loads it before the store is open).  Two kinds of name the catalog allows cannot be
named here: one that is all digits beyond 2**64-1 (refused as an out-of-range id), and a
snapshot name holding ".." (read as a range); the catalog should stop making them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import errors

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
# Snapshot names may also hold ':' and '+' (automatic ones: auto-2026-11-25T12:00+08:00).
SNAP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
SNAP_NAME_RULE = ("1-64 characters: letters, digits, '.', '_', '-', ':' or '+', starting with a "
                  "letter or digit")
DIGITS = re.compile(r"[0-9]+")  # not str.isdigit(): '²'.isdigit() is True
U64_MAX = (1 << 64) - 1
FORMS = "VOLUME, VOLUME@SNAPSHOT"


@dataclass(frozen=True)
class ExportSpec:
    volume: str
    snapshot: str | None = None  # a name, or an id as ASCII digits
    until: str | None = None  # VOLUME@A..B: snapshot is A, until is B

    @classmethod
    def parse(cls, text: str, *, snapshot: bool | None = None,
              ranges: bool = False) -> ExportSpec:
        """Parse text.  snapshot=True requires VOLUME@SNAPSHOT, False refuses it, None takes
        either; a range VOLUME@A..B is refused (Unsupported) unless ranges=True."""
        if not isinstance(text, str):
            raise errors.InvalidArgument(f"invalid reference {text!r}: not a string")
        want = "VOLUME@SNAPSHOT" if snapshot else "VOLUME" if snapshot is False else FORMS
        volume, at, rest = text.partition("@")
        if not volume or (at and not rest):
            raise errors.InvalidArgument(f"invalid reference {text!r}: expected {want}")
        _check_name(volume, "volume")
        if not at:
            if snapshot:
                raise errors.InvalidArgument(f"{text!r} names no snapshot: expected {want}")
            return cls(volume)
        if snapshot is False:
            raise errors.InvalidArgument(f"{text!r} names a snapshot: expected {want}")
        first, dots, last = rest.partition("..")
        if dots:
            if not first or not last or ".." in last:
                raise errors.InvalidArgument(
                    f"invalid range {text!r}: expected VOLUME@SNAPSHOT..SNAPSHOT")
            _check_snapshot(first)
            _check_snapshot(last)
            if not ranges:
                raise errors.Unsupported(
                    f"{text!r}: ranges of snapshots (changed blocks between two) are not "
                    f"supported yet; use {FORMS}")
            return cls(volume, first, last)
        _check_snapshot(rest)
        return cls(volume, rest)

    @property
    def snapshot_id(self) -> int | None:
        """The snapshot as an id, when its text is one (it may also be a name: the engine
        looks names up first)."""
        return int(self.snapshot) if self.snapshot and DIGITS.fullmatch(self.snapshot) else None

    def __str__(self) -> str:
        if self.snapshot is None:
            return self.volume
        return f"{self.volume}@{self.snapshot}" + (f"..{self.until}" if self.until else "")


def _check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name):
        raise errors.InvalidName(f"invalid {what} name {name!r}: {NAME_RULE}")


def _check_snapshot(text: str) -> None:
    if DIGITS.fullmatch(text) and int(text) > U64_MAX:
        raise errors.InvalidArgument(f"snapshot id {text} is out of range (0 .. {U64_MAX})")
    if not SNAP_NAME.fullmatch(text):
        raise errors.InvalidName(f"invalid snapshot name {text!r}: {SNAP_NAME_RULE}")
