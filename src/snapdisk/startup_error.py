"""Why a server failed to start, handed from the plugin (inside nbdkit) to `snapdisk serve`.

nbdkit runs the plugin's after_fork in its background process; when opening the store fails
there (a damaged store, another writer, a format this version does not read), the plugin writes
the error here before nbdkit exits, and daemon.serve raises the same error class, so the CLI
exits with its code (10 for a damaged store) and one clear line instead of a server log tail.

    STORE/server.error    JSON {"code": errors code, "message": text}, mode 0600; removed by
                          the next start
"""

from __future__ import annotations

import contextlib
import json
import os

from . import errors

NAME = "server.error"


def path(store: str) -> str:
    return os.path.join(store, NAME)


def clear(store: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(store))


def write(store: str, exc: errors.SnapdiskError) -> None:
    """Best effort: a store we cannot write to leaves the log as the only account."""
    with contextlib.suppress(OSError):
        fd = os.open(path(store), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"code": exc.code, "message": exc.message}, f)


def take(store: str) -> errors.SnapdiskError | None:
    """The error a failed start left, removed; None if it left none (or an unreadable one)."""
    try:
        with open(path(store)) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    clear(store)
    if not isinstance(d, dict) or not isinstance(d.get("code"), str):
        return None
    return errors.from_code(d["code"], str(d.get("message", "")))
