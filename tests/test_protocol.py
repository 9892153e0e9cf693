"""control/protocol.py: message encoding and strict parsing, the line reader, and a
property-based fuzz test of a running control server (exactly one reply per request line, and
a server that still answers afterwards)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapdisk import errors
from snapdisk.control import ops, protocol
from snapdisk.control.client import Client
from snapdisk.control.server import ControlServer
from snapdisk.volume import Engine

MiB = 1 << 20


# ---- encoding -----------------------------------------------------------------------------

def test_encode_is_one_compact_line() -> None:
    data = protocol.encode({"id": 1, "ok": True, "result": {"a": [1, "x\ny"]}})
    assert data == b'{"id":1,"ok":true,"result":{"a":[1,"x\\ny"]}}\n'
    assert data.count(b"\n") == 1
    with pytest.raises(ValueError):
        protocol.encode({"id": float("nan")})


def test_replies_and_greeting() -> None:
    assert protocol.ok_reply(3, None) == {"id": 3, "ok": True, "result": None}
    err = protocol.error_reply("x", errors.VolumeNotFound("no volume 'a'"))
    assert err == {"id": "x", "ok": False,
                   "error": {"code": "volume-not-found", "message": "no volume 'a'"}}
    g = protocol.greeting(["b", "a"])["snapdisk"]
    assert g["protocol"] == protocol.PROTOCOL_VERSION and g["capabilities"] == ["a", "b"]
    assert protocol.parse_greeting(protocol.encode(protocol.greeting(["a"]))[:-1])["capabilities"] \
        == ["a"]


def test_parse_greeting_refuses_others() -> None:
    other = {"snapdisk": {"version": "9", "protocol": 99, "capabilities": []}}
    with pytest.raises(errors.Unsupported):
        protocol.parse_greeting(json.dumps(other).encode())
    for junk in (b"SSH-2.0-OpenSSH", b'{"snapdisk": {"protocol": 1}}', b"[]", b"\xff"):
        with pytest.raises(errors.ServerError):
            protocol.parse_greeting(junk)


# ---- parsing requests ---------------------------------------------------------------------

def test_parse_request() -> None:
    r = protocol.parse_request(b'{"id": 7, "op": "volume.info", "args": {"name": "w"}}')
    assert (r.id, r.op, r.args, r.job) == (7, "volume.info", {"name": "w"}, False)
    r = protocol.parse_request(b'{"op": "volume.list", "args": null, "job": true}')
    assert (r.id, r.args, r.job) == (None, {}, True)
    assert protocol.parse_request(b'{"op": "x", "job": null}').job is False


@pytest.mark.parametrize("line, req_id, text", [
    (b"{oops", None, "malformed JSON"),
    (b"[1]", None, "JSON object"),
    (b'{"id": [1], "op": "x"}', None, "id"),
    (b'{"id": 1}', 1, "op"),
    (b'{"id": 2, "op": "x", "args": 3}', 2, "args"),
    (b'{"id": 3, "op": "x", "job": 1}', 3, "job"),
    (b'{"id": 4, "op": "x", "more": 1}', 4, "unknown request fields"),
    # Not JSON (RFC 8259), though Python's json reads it: never run, never echoed.
    (b'{"id": NaN, "op": "volume.list"}', None, "NaN"),
    (b'{"id": Infinity, "op": "volume.list"}', None, "Infinity"),
    (b'{"id": -Infinity, "op": "volume.list"}', None, "Infinity"),
    (b'{"id": 1e400, "op": "volume.list"}', None, "out of range"),
    (b'{"id": 1, "op": "x", "args": {"n": -1e999}}', None, "out of range"),
    (b'{"id": 1, "op": "x", "args": {"n": ' + b"9" * 5000 + b"}}", None, "malformed"),
    # UTF-8 only: json.loads would read these bytes as UTF-16.
    ('{"id": 1, "op": "volume.list"}'.encode("utf-16-le"), None, "malformed"),
    (b'{"id": "\xff", "op": "x"}', None, "utf-8"),
])
def test_parse_request_rejects(line: bytes, req_id: Any, text: str) -> None:
    with pytest.raises(protocol.BadRequest) as e:
        protocol.parse_request(line)
    assert e.value.req_id == req_id and text in e.value.message, e.value.message
    assert e.value.code == "invalid-argument"


def test_depth_limit() -> None:
    ok = b"[" * protocol.MAX_DEPTH + b"]" * protocol.MAX_DEPTH
    protocol.check_depth(ok)
    with pytest.raises(ValueError, match="deeper"):
        protocol.check_depth(b"[" + ok + b"]")
    # Brackets in strings, escaped quotes included, do not count.
    protocol.check_depth(b'{"a": "' + b"[" * 1000 + b'\\"' + b"{" * 1000 + b'"}')
    with pytest.raises(ValueError):
        protocol.check_depth(b'{"a": "\\\\"' + b", " + b"[" * 40)
    # Hostile input is refused quickly, at the first bracket past the limit.
    t = time.monotonic()
    for hostile in (b"[" * 200000, b'{"a":' * 200000, b"[" * (MiB - 1)):
        with pytest.raises(protocol.BadRequest, match="deeper"):
            protocol.parse_request(hostile)
    assert time.monotonic() - t < 5


def test_parse_reply_and_events() -> None:
    ev = protocol.parse_reply(b'{"event": "job.finished", "job": 1, "ok": true, "result": 2}')
    assert protocol.is_event(ev) and ev["job"] == 1
    reply = protocol.parse_reply(b'{"id": 1, "ok": true, "result": null}')
    assert not protocol.is_event(reply) and reply["ok"] is True
    assert not protocol.is_event({"id": 1, "event": "x"}) and not protocol.is_event([1])
    for junk in (b"{", b'{"id": 1}', b'{"id": 1, "ok": false}', b"[]", b'{"id": NaN, "ok": true}'):
        with pytest.raises(errors.ServerError):
            protocol.parse_reply(junk)


# ---- the line reader ----------------------------------------------------------------------

def test_line_reader() -> None:
    a, b = socket.socketpair()
    try:
        reader = protocol.LineReader(b, limit=10)
        a.sendall(b"one\ntw")
        assert reader.readline() == b"one"
        a.sendall(b"o\n\nthree")
        assert reader.readline() == b"two" and reader.readline() == b""
        a.sendall(b"\n" + b"x" * 11 + b"\n")
        assert reader.readline() == b"three"
        with pytest.raises(protocol.Oversized, match="request line longer than 10"):
            reader.readline()
        a.sendall(b"partial")
        a.shutdown(socket.SHUT_WR)
        assert protocol.LineReader(b).readline() is None  # a partial last line is dropped
    finally:
        a.close()
        b.close()


def test_line_reader_long_line_is_scanned_once() -> None:
    """A 48 MiB reply arrives in many chunks; each chunk is searched for the newline once
    (searching the whole buffer each time was quadratic)."""
    a, b = socket.socketpair()
    line = b"y" * (48 * MiB)
    sender = threading.Thread(target=lambda: (a.sendall(line + b"\n"), a.close()))
    sender.start()
    try:
        t = time.monotonic()
        got = protocol.LineReader(b, limit=protocol.MAX_REPLY_BYTES, what="reply").readline()
        assert got == line
        assert time.monotonic() - t < 20
    finally:
        sender.join()
        b.close()


# ---- fuzzing a running control server -----------------------------------------------------

@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    """A control server in this process (the same class the nbdkit plugin runs), on a small
    store with one volume and one snapshot."""
    store = make_store(Path(tmp_path_factory.mktemp("proto")) / "store", volumes={"v": MiB})
    engine = Engine.open(store)
    engine.create_snapshot("v", "s")
    server = ControlServer(engine, os.path.join(store, "control.sock"))
    server.start()
    try:
        yield server
    finally:
        assert server.close(10)
        engine.close()


class Conn:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.reader = protocol.LineReader(self.sock, limit=protocol.MAX_REPLY_BYTES)
        assert "snapdisk" in json.loads(self.line())

    def line(self) -> bytes:
        line = self.reader.readline()
        assert line is not None, "the server closed the connection"
        return line

    def reply(self) -> dict[str, Any]:
        """The next reply (skipping event lines), parsed as strict JSON."""
        while True:
            msg = protocol.loads(self.line())
            if not protocol.is_event(msg):
                assert isinstance(msg, dict) and msg.get("ok") in (True, False), msg
                if msg["ok"] is False:
                    assert isinstance(msg["error"]["code"], str) and msg["error"]["message"]
                return msg


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=20))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
OP_NAMES = sorted(ops.OPS) + ["", "nope", "volume.", "job"]
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(OP_NAMES) | st.text(max_size=12)},
    optional={"id": json_values, "args": json_values | st.dictionaries(
        st.sampled_from(["name", "volume", "snapshot", "job", "timeout", "events", "x"]),
        json_values, max_size=3), "job": json_values, "extra": json_values})


def _json_line(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


lines = st.one_of(
    json_values.map(_json_line),
    requests.map(_json_line),
    st.binary(max_size=200),  # bad UTF-8, control bytes, nothing like JSON
    st.integers(1, 300000).map(lambda n: b"[" * n),
    st.integers(1, 100000).map(lambda n: b'{"op":' * n),
    st.integers(1, 2000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 6000).map(lambda n: b'{"id": ' + b"7" * n + b', "op": "status"}'),
    st.sampled_from([b"NaN", b"Infinity", b'{"id": NaN, "op": "volume.list"}',
                     b'{"id": -Infinity, "op": "status"}', b'{"id": 1e999, "op": "status"}',
                     b'"\\ud800"', b'{"id": "\\udfff", "op": "volume.info", "args": {"name": "\\ud800"}}',
                     b'{"id": 18446744073709551616, "op": "snapshot.info", '
                     b'"args": {"volume": "v", "snapshot": 18446744073709551616}}']),
).map(lambda b: b.replace(b"\n", b" "))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(batch=st.lists(lines, min_size=1, max_size=5))
def test_fuzz_one_reply_per_request(control: ControlServer, batch: list[bytes]) -> None:
    conn = Conn(control.path)
    try:
        # Each request line, then a sentinel: the sentinel's reply must come right after
        # exactly one reply to the line (none to a blank line: the protocol skips those).
        for i, line in enumerate(batch):
            sentinel = {"id": f"sentinel-{i}", "op": "status"}
            conn.sock.sendall(line + b"\n" + _json_line(sentinel) + b"\n")
            if line.strip():
                first = conn.reply()
                assert first.get("id") != sentinel["id"], f"no reply to {line[:80]!r}"
            after = conn.reply()
            assert after == {"id": sentinel["id"], "ok": True, "result": after["result"]}, after
    finally:
        conn.sock.close()
    with Client(control.path, timeout=20) as c:  # the server is alive and well
        assert c.call("status")["running"] is True


def test_invalid_request_never_runs(control: ControlServer) -> None:
    conn = Conn(control.path)
    try:
        for bad in (b'{"id": NaN, "op": "volume.create", "args": {"name": "nan1", "size_bytes": 4096}}',
                    b'{"id": 1e400, "op": "volume.create", "args": {"name": "nan2", "size_bytes": 4096}}',
                    b'{"id": 1, "op": "volume.create", "args": {"name": "nan3", "size_bytes": 4096, '
                    b'"pad": ' + b"[" * 100 + b"]" * 100 + b"}}"):
            conn.sock.sendall(bad + b"\n")
            reply = conn.reply()
            assert reply["ok"] is False and reply["id"] is None
            assert reply["error"]["code"] == "invalid-argument"
        conn.sock.sendall(b'{"id": 9, "op": "volume.list"}\n')
        names = {v["name"] for v in conn.reply()["result"]}
        assert not names & {"nan1", "nan2", "nan3"}
    finally:
        conn.sock.close()
