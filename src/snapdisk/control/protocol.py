"""The control protocol: newline-delimited JSON over the unix socket STORE/control.sock.

One JSON object per line, UTF-8, each way (docs/control.md is the reference):

    server -> client, once, on connect:
        {"snapdisk": {"version": "0.1.0", "protocol": 1, "capabilities": ["volume.create", ...]}}
    client -> server:
        {"id": 1, "op": "volume.create", "args": {"name": "vm1", "size_bytes": 10737418240}}
    server -> client, one reply per request, in order:
        {"id": 1, "ok": true, "result": {...}}
        {"id": 1, "ok": false, "error": {"code": "already-exists", "message": "..."}}

`code` is the `code` of a class in snapdisk.errors, so a client raises the same exception the
engine raised.  A line longer than MAX_LINE_BYTES is answered with an error and the connection
is closed (the rest of that line cannot be told from the next request); every other bad request
is answered and the connection stays usable.  This module only shapes messages; it does no I/O
beyond reading one bounded line.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from .. import errors

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20
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


@dataclass
class Request:
    id: JSONScalar
    op: str
    args: dict[str, Any]


def parse_request(line: bytes) -> Request:
    """A request from one line (without its newline); BadRequest carries the id when known."""
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
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
    extra = set(msg) - {"id", "op", "args"}
    if extra:
        raise BadRequest(f"unknown request fields: {', '.join(sorted(extra))}", req_id)
    return Request(req_id, op, args)


def parse_greeting(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
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
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise errors.ServerError(f"malformed reply from the server: {e}") from None
    if not isinstance(msg, dict) or "ok" not in msg or (
            msg["ok"] is False and not isinstance(msg.get("error"), dict)):
        raise errors.ServerError(f"malformed reply from the server: {line[:200]!r}")
    reply: dict[str, Any] = msg
    return reply


class LineReader:
    """Reads newline-terminated lines of at most `limit` bytes from a socket."""

    def __init__(self, sock: socket.socket, limit: int = MAX_LINE_BYTES):
        self.sock = sock
        self.limit = limit
        self._buf = bytearray()

    def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream (a partial last line is
        dropped); Oversized once the line passes the limit (the stream is then unusable)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                if nl > self.limit:
                    raise Oversized(f"request line longer than {self.limit} bytes")
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line
            if len(self._buf) > self.limit:
                raise Oversized(f"request line longer than {self.limit} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
