"""The S3 client of backups (boto3): the s3:// URL, the endpoint, credentials, one Bucket
object with the few calls the repository needs, and S3 errors turned into snapdisk errors.

Credentials follow boto3's default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, ~/.aws/credentials and config, AWS_PROFILE, ...), never the command line.
The CLI resolves them in its own process and passes them in the control request (never logged,
never kept in a job: control/backup_ops.py), so a server started by another user or with
another environment uses the caller's.  The endpoint: --endpoint, else SNAPDISK_S3_ENDPOINT,
else AWS_ENDPOINT_URL, else AWS itself.  Addressing is path-style (radosgw, MinIO).
"""

from __future__ import annotations

import email.utils
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import errors

ENDPOINT_ENV = ("SNAPDISK_S3_ENDPOINT", "AWS_ENDPOINT_URL")
CREDENTIAL_ARGS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def parse_url(url: str) -> tuple[str, str]:
    """'s3://BUCKET/PREFIX' -> (BUCKET, 'PREFIX/') ('' for no prefix)."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise errors.InvalidArgument(f"{url!r}: a repository is s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    if not 3 <= len(bucket) <= 63 or "/" in bucket:
        raise errors.InvalidArgument(f"{url!r}: the bucket name must be 3-63 characters")
    return bucket, prefix + "/" if prefix else ""


def endpoint(given: str | None) -> str | None:
    if given:
        return given
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def caller_credentials() -> dict[str, Any]:
    """The caller's credentials and region from boto3's default chain, as request arguments
    (empty when the chain finds none: the server then uses its own)."""
    import boto3  # type: ignore[import-untyped]
    session = boto3.Session()
    out: dict[str, Any] = {}
    creds = session.get_credentials()
    if creds is not None:
        f = creds.get_frozen_credentials()
        out = {"aws_access_key_id": f.access_key, "aws_secret_access_key": f.secret_key}
        if f.token:
            out["aws_session_token"] = f.token
    if session.region_name:
        out["region"] = session.region_name
    return out


def _timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, fast for the two forms radosgw sends: ISO 8601 in listings
    (fromisoformat, 'Z' included since Python 3.11) and the HTTP date of Last-Modified on every
    GET.  botocore's own (dateutil) took ~70 us each: 80 ms of listing a 1 GiB volume's chunks,
    and as much again over a restore's GETs.  Anything else, or a time without a zone, goes to
    botocore's."""
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value) if value[:1].isdigit() \
                else email.utils.parsedate_to_datetime(value)
            if t.tzinfo is not None:
                return t
        except (TypeError, ValueError):
            pass
    from botocore.utils import parse_timestamp  # type: ignore[import-untyped]
    return parse_timestamp(value)  # type: ignore[no-any-return]


_session: Any = None
_session_lock = threading.Lock()


def _boto_session() -> Any:
    """One boto3 session for every Bucket of this process (its models load once, and its
    credential chain resolves as boto3's default session's does), whose response parsers use
    _timestamp."""
    global _session
    with _session_lock:
        if _session is None:
            import boto3
            import botocore.session  # type: ignore[import-untyped]
            core = botocore.session.get_session()
            core.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=_timestamp)
            _session = boto3.session.Session(botocore_session=core)
        return _session


@dataclass
class Stats:
    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    get_bytes: int = 0


class Bucket:
    """One bucket and key prefix.  boto3 clients are thread-safe: the thread pools share it."""

    def __init__(self, url: str, endpoint_url: str | None = None,
                 credentials: dict[str, Any] | None = None, threads: int = 8):
        from botocore.config import Config  # type: ignore[import-untyped]
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        creds = {k: v for k, v in (credentials or {}).items() if k in CREDENTIAL_ARGS and v}
        region = (credentials or {}).get("region") or os.environ.get("AWS_DEFAULT_REGION") \
            or "us-east-1"
        # No SigV4 payload hash: snapdisk checksums every object itself (a chunk's name is
        # the sha256 of its data, checked on every read), and hashing each body a second time
        # for the signature cost ~1 ms per MiB of the 2 cores the S3 server shares here.
        cfg: dict[str, Any] = {"s3": {"addressing_style": "path",
                                      "payload_signing_enabled": False},
                               "signature_version": "s3v4",
                               # the few calls here are always well-formed: botocore's
                               # per-call validation is pure overhead (CPU the server shares)
                               "parameter_validation": False,
                               "retries": {"max_attempts": 3, "mode": "standard"},
                               "max_pool_connections": threads + 4,
                               "connect_timeout": 10, "read_timeout": 60}
        self.endpoint = endpoint(endpoint_url)
        self.stats = Stats()
        try:
            self.client = _boto_session().client("s3", endpoint_url=self.endpoint,
                                                 region_name=region, config=Config(**cfg),
                                                 **creds)
        except Exception as e:
            raise errors.InvalidArgument(f"{url}: cannot make an S3 client: {e}") from None

    def where(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def _fail(self, e: Exception, name: str) -> errors.SnapdiskError:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return errors.NotFound(f"{self.where(name)} does not exist")
        if code == "NoSuchBucket":
            return errors.NotFound(f"bucket {self.bucket!r} does not exist "
                                   f"({self.endpoint or 'AWS'})")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return errors.PermissionDenied(f"{self.where(name)}: access denied ({code}): "
                                           "check the AWS credentials")
        return errors.ServerError(f"{self.where(name)}: the object store failed: {e}")

    def get(self, name: str) -> bytes:
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket,
                                                 Key=self.prefix + name)["Body"].read()
        except Exception as e:
            raise self._fail(e, name) from e
        self.stats.gets += 1
        self.stats.get_bytes += len(data)
        return data

    def put(self, name: str, data: bytes, create_only: bool = False) -> bool:
        """Write an object; with create_only, False if it exists already (nothing written)."""
        kw: dict[str, Any] = {}
        if create_only:
            # If-None-Match: * (radosgw answers 412 on an existing key); boto3 1.26 has no
            # parameter for it, so it goes in as a header.
            def header(request: Any, **_: Any) -> None:
                request.headers["If-None-Match"] = "*"
            kw["header"] = header
            self.client.meta.events.register_first("before-sign.s3.PutObject", header)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if create_only and code in ("PreconditionFailed", "412"):
                return False
            raise self._fail(e, name) from e
        finally:
            if create_only:
                self.client.meta.events.unregister("before-sign.s3.PutObject", kw["header"])
        self.stats.puts += 1
        self.stats.put_bytes += len(data)
        return True

    def delete(self, names: list[str]) -> None:
        for i in range(0, len(names), 1000):  # DeleteObjects takes up to 1000 keys
            batch = [{"Key": self.prefix + n} for n in names[i:i + 1000]]
            try:
                r = self.client.delete_objects(Bucket=self.bucket,
                                               Delete={"Objects": batch, "Quiet": True})
            except Exception as e:
                raise self._fail(e, names[i]) from e
            if r.get("Errors"):
                raise errors.ServerError(f"{self.where()}: cannot delete: {r['Errors'][0]}")

    def list(self, under: str) -> Iterator[tuple[str, int, float]]:
        """(name relative to the prefix, size, last modified) of every object under it."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + under)
        try:
            for page in pages:
                for o in page.get("Contents", []):
                    yield (o["Key"][len(self.prefix):], int(o["Size"]),
                           o["LastModified"].timestamp())
        except Exception as e:
            raise self._fail(e, under) from e

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._fail(e, "") from e
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._fail(e, "") from e
