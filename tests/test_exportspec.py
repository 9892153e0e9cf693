"""ExportSpec: the one parser of VOLUME, VOLUME@SNAPSHOT and (refused for now) VOLUME@A..B."""

from __future__ import annotations

import pytest

from snapdisk import errors
from snapdisk.exportspec import U64_MAX, ExportSpec


@pytest.mark.parametrize("text, volume, snapshot", [
    ("vm", "vm", None), ("vm@snap-1", "vm", "snap-1"), ("vm.2_x@3", "vm.2_x", "3"),
    ("a" * 64, "a" * 64, None), (f"v@{U64_MAX}", "v", str(U64_MAX)), ("v@0", "v", "0"),
])
def test_parses(text: str, volume: str, snapshot: str | None) -> None:
    spec = ExportSpec.parse(text)
    assert (spec.volume, spec.snapshot, spec.until) == (volume, snapshot, None)
    assert str(spec) == text


def test_snapshot_id() -> None:
    assert ExportSpec.parse("v@42").snapshot_id == 42
    assert ExportSpec.parse("v@s42").snapshot_id is None
    assert ExportSpec.parse("v").snapshot_id is None


@pytest.mark.parametrize("text, cls, words", [
    ("", errors.InvalidArgument, "expected"),
    ("@s", errors.InvalidArgument, "expected"),
    ("vm@", errors.InvalidArgument, "expected"),
    ("vm\n", errors.InvalidName, "volume name"),  # a full match: no trailing newline
    ("vm@s\n", errors.InvalidName, "snapshot name"),
    ("vm@²", errors.InvalidName, "snapshot name"),  # '²'.isdigit() is True
    ("vm@٣", errors.InvalidName, "snapshot name"),  # an Arabic-Indic digit
    ("vm@99999999999999999999999", errors.InvalidArgument, "out of range"),
    (f"vm@{U64_MAX + 1}", errors.InvalidArgument, "out of range"),
    ("vm@-1", errors.InvalidName, "snapshot name"),
    ("a" * 65, errors.InvalidName, "volume name"),
    ("bad/name", errors.InvalidName, "volume name"),
    (".hidden", errors.InvalidName, "volume name"),
    ("vm@a@b", errors.InvalidName, "snapshot name"),
    ("vm@\ud800", errors.InvalidName, "snapshot name"),
])
def test_rejects(text: str, cls: type[errors.SnapdiskError], words: str) -> None:
    with pytest.raises(cls) as e:
        ExportSpec.parse(text)
    assert words in e.value.message


def test_snapshot_required_or_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="VOLUME@SNAPSHOT"):
        ExportSpec.parse("vm", snapshot=True)
    with pytest.raises(errors.InvalidArgument, match="names a snapshot"):
        ExportSpec.parse("vm@s", snapshot=False)
    assert ExportSpec.parse("vm@s", snapshot=True).snapshot == "s"


def test_ranges_parse_but_are_unsupported() -> None:
    with pytest.raises(errors.Unsupported, match="not supported yet"):
        ExportSpec.parse("vm@a..b")
    spec = ExportSpec.parse("vm@1..b", ranges=True)
    assert (spec.volume, spec.snapshot, spec.until) == ("vm", "1", "b")
    assert str(spec) == "vm@1..b"
    for bad in ("vm@..b", "vm@a..", "vm@a..b..c", "vm@a..²"):
        with pytest.raises(errors.InvalidArgument):
            ExportSpec.parse(bad, ranges=True)


def test_not_a_string() -> None:
    with pytest.raises(errors.InvalidArgument):
        ExportSpec.parse(3)  # type: ignore[arg-type]
