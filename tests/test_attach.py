"""attach's refusals that need no FUSE or block device (test_e2e_fs drives real attaches)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Served, make_store
from e2e_helpers import run_cli

from snapdisk import attach, errors

MiB = 1 << 20


@pytest.mark.parametrize("export", ["../x", ".x", "a/b", "v@²", "v\n", "v@a..b"])
def test_export_names_are_checked_first(tmp_path: Path, export: str) -> None:
    with pytest.raises((errors.InvalidArgument, errors.Unsupported)):
        attach.attach(str(tmp_path), export)


@pytest.mark.skipif(os.geteuid() != 0, reason="attach needs root")
@pytest.mark.skipif(os.path.isdir("/sys/module/nbd"), reason="this kernel has an nbd driver")
def test_method_nbd_without_the_driver_is_unsupported(tmp_path: Path,
                                                      served: Callable[..., Served]) -> None:
    s = served(make_store(tmp_path / "store", volumes={"v": MiB}))
    with pytest.raises(errors.Unsupported) as e:
        attach.attach(s.store, "v", method="nbd")
    assert "nbd driver" in e.value.message
    r = run_cli(s.store, "attach", "v", "--method", "nbd", check=False)
    assert r.returncode == errors.Unsupported.exit_code and "--method loop" in r.stderr, r
    assert attach.list_attachments(s.store) == []
