"""What attach made, on disk: one JSON record per export in STORE/attach/EXPORT.json (written
atomically: temp file, fsync, rename), and STORE/attach/.lock, the flock that serializes the
attaches and detaches of one store.  Also the paths both methods use."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

from .. import errors


def attach_dir(store: str) -> str:
    return os.path.join(os.path.abspath(store), "attach")


def nbd_socket(store: str) -> str:
    return os.path.join(os.path.abspath(store), "nbd.sock")


def export_uri(store: str, export: str) -> str:
    from ..listen import export_uri
    return export_uri(f"unix:{nbd_socket(store)}", export)


def record_path(store: str, export: str) -> str:
    return os.path.join(attach_dir(store), export + ".json")



@contextlib.contextmanager
def locked(store: str) -> Iterator[None]:
    if not os.path.isdir(store):
        raise errors.StoreNotFound(f"no snapdisk store in {store}")
    os.makedirs(attach_dir(store), mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(attach_dir(store), ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load(store: str, export: str) -> dict[str, Any] | None:
    try:
        with open(record_path(store, export)) as f:
            rec: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    return rec


def save(store: str, rec: dict[str, Any]) -> None:
    path = record_path(store, rec["export"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def forget(store: str, export: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(store, export))
