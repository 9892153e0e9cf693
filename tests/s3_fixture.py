"""The session's real S3 server (tests/radosgw.py), as pytest fixtures.

`s3_server`: one memstore Ceph cluster with radosgw per test session, on a free port pair of
127.0.0.1; its endpoint and keys are exported in the environment (AWS_*, SNAPDISK_S3_ENDPOINT)
for the code under test and the CLI subprocesses; torn down (every daemon SIGKILLed by pid)
however the session ends.  Skipped, with the reason, only when radosgw is not installed (and
failed then too when S3_REQUIRED=1, as CI sets).  `s3_url`: a fresh bucket per test.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import radosgw


@pytest.fixture(scope="session")
def s3_server() -> Iterator[radosgw.Radosgw]:
    why = radosgw.installed()
    if why:
        if os.environ.get("S3_REQUIRED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    d = tempfile.mkdtemp(prefix="snapdisk-rgw-", dir="/var/tmp")
    gw = radosgw.start(d, radosgw.free_port_pair())
    saved = {k: os.environ.get(k) for k in gw.env()}
    os.environ.update(gw.env())
    try:
        yield gw
    finally:
        gw.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_url(s3_server: radosgw.Radosgw) -> str:
    """s3://BUCKET/PREFIX of a new, empty bucket (made by the first backup)."""
    return f"s3://t-{uuid.uuid4().hex[:12]}/repo"
