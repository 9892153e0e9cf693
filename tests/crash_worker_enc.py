"""tests/crash_worker.py on encrypted volumes (tests/test_crypto.py's kill -9 test): the store
is opened with its encrypted volumes unlocked by the test's key file, then the same seeded
workload runs."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import crash_worker  # noqa: E402

from snapdisk import keys  # noqa: E402
from snapdisk.engine import Engine  # noqa: E402

KEY = keys.Secret(key_file=bytes(range(100, 132)))


def open_unlocked(path: str) -> Engine:
    e = Engine.open(path)
    for v in e.list_volumes():
        if v.encrypted and v.locked:
            e.unlock(v.name, KEY)
    return e


class _Opener:
    open = staticmethod(open_unlocked)


if __name__ == "__main__":
    crash_worker.Engine = _Opener  # type: ignore[misc,assignment]
    crash_worker.main()
