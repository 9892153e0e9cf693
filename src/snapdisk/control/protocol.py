"""The control protocol: newline-delimited JSON over the unix socket STORE/control.sock.

One JSON object per line, UTF-8, each way (docs/control.md is the reference):

    server -> client, once, on connect:
        {"snapdisk": {"version": "0.1.0", "protocol": 1, "capabilities": ["volume.create", ...]}}
    client -> server:
        {"id": 1, "op": "volume.create", "args": {"name": "vm1", "size_bytes": 10737418240}}
    server -> client, one reply per request, in order:
        {"id": 1, "ok": true, "result": {...}}
        {"id": 1, "ok": false, "error": {"code": "already-exists", "message": "..."}}
    a long op as a job ("job": true): the reply names the job at once, the op runs on
        {"id": 2, "op": "rollback", "args": {...}, "job": true}
        {"id": 2, "ok": true, "result": {"job": 1}}
    server -> client, only while a `job.wait` with "events": true runs, before its reply:
        {"event": "job.progress", "job": 1, "done": 3, "total": 10}
        {"event": "job.finished", "job": 1, "ok": true, "result": {...}}

`code` is the `code` of a class in snapdisk.errors, so a client raises the same exception the
engine raised.  A request line longer than MAX_LINE_BYTES is answered with an error and the
connection is closed (the rest of that line cannot be told from the next request); every other
bad request is answered and the connection stays usable.  Requests are strict JSON (RFC 8259):
no NaN or Infinity, no number that overflows to one, nesting at most MAX_DEPTH deep, UTF-8
only.  A reply may be longer than a request, up to MAX_REPLY_BYTES (the server refuses to send
a longer one and says so instead).  This module only shapes messages; it does no I/O beyond
reading one bounded line.
"""

from __future__ import annotations

import json
import math
import re
import socket
from dataclasses import dataclass
from typing import Any

from .. import errors

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20
# Replies carry lists (usage with every volume at its snapshot quotas, volume.list with
# thousands of volumes): 1 MiB is a few thousand objects, 64 MiB a few hundred thousand, which
# a client still parses in a second or so.  Past that the server replies with an error.
MAX_REPLY_BYTES = 64 << 20
# A request is three levels deep; anything much deeper is hostile (json's C scanner recurses
# once per level: "[" * 200000 raised RecursionError in the connection's thread).
MAX_DEPTH = 32
JSONScalar = str | int | float | bool | None


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("snapdisk")
    except Exception:  # not installed (nbdkit's python with only src/ on its path)
        return "0.1.0"


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def greeting(capabilities: list[str]) -> dict[str, Any]:
    return {"snapdisk": {"version": package_version(), "protocol": PROTOCOL_VERSION,
                         "capabilities": sorted(capabilities)}}


def ok_reply(req_id: JSONScalar, result: Any) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def error_reply(req_id: JSONScalar, exc: errors.SnapdiskError) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": {"code": exc.code, "message": exc.message}}


# Defined with every other error in errors.py; named here too for the protocol's users.
BadRequest = errors.BadRequest
Oversized = errors.Oversized


def is_event(msg: Any) -> bool:
    """An event line (job.progress, job.finished): not a reply to any request (a reply always
    has an "id")."""
    return isinstance(msg, dict) and isinstance(msg.get("event"), str) and "id" not in msg


@dataclass
class Request:
    id: JSONScalar
    op: str
    args: dict[str, Any]
    job: bool = False  # run as a job: reply {"job": ID} at once (ops.start_job)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf: no reply could echo it back
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# String literals (the unrolled-loop form: linear, no backtracking), then the brackets left.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """ValueError if the JSON text nests deeper than limit: checked before parsing, because
    the parser recurses once per level.  Stops at the first bracket past the limit."""
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', data)):
        depth += 1 if m.group() in b"[{" else -1
        if depth > limit:
            raise ValueError(f"nested deeper than {limit} levels")


def loads(data: bytes) -> Any:
    """Strict JSON from bytes: UTF-8 only (json.loads would guess UTF-16 or UTF-32 from the
    byte pattern), no NaN/Infinity, no overflowing numbers, bounded nesting.  ValueError (a
    UnicodeDecodeError is one) for anything else."""
    text = data.decode("utf-8")
    check_depth(data)
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:  # check_depth should have caught it; never let it kill a thread
        raise ValueError("nested too deeply") from None


def parse_request(line: bytes) -> Request:
    """A request from one line (without its newline); BadRequest carries the id when known."""
    try:
        msg = loads(line)
    except ValueError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(msg, dict):
        raise BadRequest("a request is a JSON object: {\"id\", \"op\", \"args\"}")
    req_id = msg.get("id")
    if not isinstance(req_id, str | int | float | bool | type(None)):
        raise BadRequest("\"id\" must be a string, a number or null")
    op = msg.get("op")
    if not isinstance(op, str):
        raise BadRequest("\"op\" must be a string naming an operation", req_id)
    args = msg.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest("\"args\" must be a JSON object", req_id)
    job = msg.get("job", False)
    if job is None:
        job = False
    if not isinstance(job, bool):
        raise BadRequest("\"job\" must be true or false", req_id)
    extra = set(msg) - {"id", "op", "args", "job"}
    if extra:
        raise BadRequest(f"unknown request fields: {', '.join(sorted(extra))}", req_id)
    return Request(req_id, op, args, job)


def parse_greeting(line: bytes) -> dict[str, Any]:
    try:
        msg = loads(line)
        info = msg["snapdisk"]
        missing = {"protocol", "version", "capabilities"} - set(info)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (ValueError, TypeError, KeyError) as e:
        raise errors.ServerError(f"not a snapdisk control socket (greeting {line[:200]!r}: {e})"
                                 ) from None
    if info["protocol"] != PROTOCOL_VERSION:
        raise errors.Unsupported(
            f"the server speaks control protocol {info['protocol']}, this client "
            f"{PROTOCOL_VERSION}: use the snapdisk that runs the server")
    result: dict[str, Any] = info
    return result


def parse_reply(line: bytes) -> dict[str, Any]:
    """A reply, or an event line (is_event) that comes before one."""
    try:
        msg = loads(line)
    except ValueError as e:
        raise errors.ServerError(f"malformed reply from the server: {e}") from None
    if is_event(msg):
        event: dict[str, Any] = msg
        return event
    if not isinstance(msg, dict) or "ok" not in msg or (
            msg["ok"] is False and not isinstance(msg.get("error"), dict)):
        raise errors.ServerError(f"malformed reply from the server: {line[:200]!r}")
    reply: dict[str, Any] = msg
    return reply


class LineReader:
    """Reads newline-terminated lines of at most `limit` bytes from a socket (the server reads
    requests with MAX_LINE_BYTES, the client replies with MAX_REPLY_BYTES)."""

    def __init__(self, sock: socket.socket, limit: int = MAX_LINE_BYTES, what: str = "request"):
        self.sock = sock
        self.limit = limit
        self.what = what
        self._buf = bytearray()
        self._scanned = 0  # no newline before this offset: a long line is scanned once

    def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream (a partial last line is
        dropped); Oversized once the line passes the limit (the stream is then unusable)."""
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl >= 0:
                if nl > self.limit:
                    raise Oversized(f"{self.what} line longer than {self.limit} bytes")
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > self.limit:
                raise Oversized(f"{self.what} line longer than {self.limit} bytes")
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                return None
            self._buf += chunk
