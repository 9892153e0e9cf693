"""The send and receive control ops (sendrecv.py; the stream format in stream.py), registered
in ops.OPS.  Both run as jobs with progress (bytes of the changed ranges done, of the total).

How a stream crosses the control socket: as a file descriptor, never as bytes in the JSON
protocol.  The client (cli/stream_cmds.py) listens on a unix socket of its own, in a private
directory, and names it in `fd_socket`; the op connects to it and receives one descriptor
(the CLI's stdout or stdin, or the file it opened) with SCM_RIGHTS (socket.recv_fds, unix(7)),
then reads or writes the stream itself.  So `snapdisk send ... | ssh host snapdisk receive ...`
moves the data between the two servers' processes through the pipes directly.  `path` instead
names a file the server opens (as the server's user) for scripts that have one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from typing import IO, Any

from .. import errors
from ..engine import Engine
from .jobs import call_with_progress
from .ops import Context, _op, _reserve, opt, req

FD_TIMEOUT = 30.0  # seconds to reach the client's descriptor socket
F_SETPIPE_SZ = 1031  # fcntl(2): a pipe's capacity; 1 MiB (the unprivileged maximum) halves
PIPE_BYTES = 1 << 20  # the context switches of a stream through a pipe


def _take_fd(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(FD_TIMEOUT)
        s.connect(path)
        _, fds, _, _ = socket.recv_fds(s, 16, 1)
    except OSError as e:
        raise errors.InvalidArgument(f"cannot take the stream's descriptor from {path}: "
                                     f"{e.strerror or e}") from None
    finally:
        s.close()
    if not fds:
        raise errors.InvalidArgument(f"{path} passed no descriptor")
    return fds[0]


@contextlib.contextmanager
def open_stream(fd_socket: str | None, path: str | None, mode: str) -> Iterator[IO[bytes]]:
    """The stream to read (mode "rb") or write ("wb"), unbuffered: from fd_socket or path."""
    if (fd_socket is None) == (path is None):
        raise errors.InvalidArgument("give the stream as fd_socket or as path (one of them)")
    if path is not None:
        try:
            f = open(path, mode, buffering=0)  # noqa: SIM115 (closed below)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot open {path}: {e.strerror}") from None
    else:
        assert fd_socket is not None
        f = os.fdopen(_take_fd(fd_socket), mode, buffering=0)
    with contextlib.suppress(OSError):  # not a pipe, or a smaller limit: keep its size
        fcntl.fcntl(f.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
    try:
        yield f
    finally:
        with contextlib.suppress(OSError):  # a reader that went away (EPIPE on the last bytes)
            f.close()


@_op("send", engine_call="send_stream", volume=req(str), snapshot=req(str, int),
     base=opt(str, int), fd_socket=opt(str), path=opt(str))
def send(engine: Engine, ctx: Context, volume: str, snapshot: str | int, base: str | int | None,
         fd_socket: str | None, path: str | None) -> Any:
    with open_stream(fd_socket, path, "wb") as f:
        return call_with_progress(engine.send_stream, volume, snapshot, f, base,
                                  progress=ctx.progress)


@_op("receive", engine_call="receive_stream", volume=req(str), fd_socket=opt(str),
     path=opt(str), force=opt(bool, default=False))
def receive(engine: Engine, ctx: Context, volume: str, fd_socket: str | None,
            path: str | None, force: bool) -> Any:
    """force: roll the volume back to its newest snapshot first if it was written since (and
    cut off its live NBD clients); without it, both are refused."""
    def reserve(vol: int, what: str) -> contextlib.AbstractContextManager[int]:
        return _reserve(ctx, vol, what, live_only=True, force=force)

    with open_stream(fd_socket, path, "rb") as f:
        return call_with_progress(engine.receive_stream, volume, f, force,
                                  progress=ctx.progress, reserve=reserve)
