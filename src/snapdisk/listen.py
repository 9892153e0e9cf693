"""Where the NBD server listens, and how a TCP client proves it may connect.

    parse_listen("tcp:127.0.0.1:10809", ...)  ->  ("tcp", "127.0.0.1", 10809)
    export_uri("tcp:127.0.0.1:10809", "vm", psk)  ->  nbds://snapdisk@127.0.0.1:10809/vm?tls-psk-file=...
    ensure_psk(STORE/tls.psk, uid)               the owner-only pre-shared key, made if missing

The unix socket's protection is the store directory's mode (0700: its owner and root); TCP's
is TLS with a pre-shared key (nbdkit-tls(1)), since any local user can connect to a loopback
port.  TCP is loopback-only either way.  docs/security.md says who can reach what.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
import urllib.parse
from typing import Any

from . import errors

TLS_USERNAME = "snapdisk"  # the PSK file's one identity
NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
NBD_OPT_ABORT = 2


def parse_listen(listen: str | None, default_socket: str) -> tuple[str, str, int]:
    """("unix", path, 0) or ("tcp", host, port).  None means default_socket."""
    if listen is None or listen == "unix":
        return "unix", default_socket, 0
    kind, _, rest = listen.partition(":")
    if kind == "unix" and rest:
        return "unix", os.path.abspath(rest), 0
    if kind == "tcp":
        host, _, port_s = rest.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_s)
            addr = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            raise errors.InvalidArgument(
                f"invalid listen address {listen!r}: use tcp:127.0.0.1:PORT") from None
        if not addr.is_loopback:
            raise errors.InvalidArgument(
                f"refusing to listen on {host}: only loopback addresses are allowed (tunnel "
                "NBD over ssh to reach it from elsewhere; see docs/security.md)")
        if not 0 < port < 65536:
            raise errors.InvalidArgument(f"invalid port {port} in {listen!r}")
        return "tcp", str(addr), port
    raise errors.InvalidArgument(f"invalid listen address {listen!r}: use unix:PATH or "
                                 "tcp:127.0.0.1:PORT")


def listen_str(kind: str, where: str, port: int) -> str:
    if kind == "unix":
        return f"unix:{where}"
    return f"tcp:[{where}]:{port}" if ":" in where else f"tcp:{where}:{port}"


def export_uri(listen: str, export: str = "", tls_psk_file: str | None = None) -> str:
    """The NBD URI of an export: nbd+unix:///VOL@SNAP?socket=PATH, nbd://127.0.0.1:PORT/VOL,
    or with TLS nbds://snapdisk@127.0.0.1:PORT/VOL?tls-psk-file=PATH (libnbd's URI form)."""
    kind, where, port = parse_listen(listen, "/")
    name = urllib.parse.quote(export, safe="@")
    if kind == "unix":
        return f"nbd+unix:///{name}?socket={where}"
    host = f"[{where}]" if ":" in where else where
    if tls_psk_file:
        return f"nbds://{TLS_USERNAME}@{host}:{port}/{name}?tls-psk-file={tls_psk_file}"
    return f"nbd://{host}:{port}/{name}"


def ensure_psk(path: str, owner_uid: int) -> str:
    """STORE/tls.psk, made now if missing: one identity, `snapdisk:` and 256 random bits in
    hex (nbdkit-tls(1)'s PSK format), readable by the store's owner only.  An existing file
    that others can read is refused rather than used."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        st = os.stat(path)
        if st.st_mode & 0o077 or st.st_uid != owner_uid:
            raise errors.PermissionDenied(
                f"{path} is readable by others or not the store owner's: anyone who can read "
                f"it can reach every volume over TCP; chown it to the store's owner and chmod "
                "600, or delete it to have a new key made") from None
        return path
    with os.fdopen(fd, "w") as f:
        f.write(f"{TLS_USERNAME}:{secrets.token_hex(32)}\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def nbd_answers(kind: str, where: str, port: int) -> bool:
    """The NBD listener answers: read the newstyle greeting, then end the handshake politely
    (NBD_OPT_ABORT, as `nbdinfo --can connect` would) so nbdkit logs no error."""
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: Any = where
        else:
            s = socket.socket(socket.AF_INET6 if ":" in where else socket.AF_INET,
                              socket.SOCK_STREAM)
            addr = (where, port)
        with s:
            s.settimeout(2.0)
            s.connect(addr)
            hello = s.recv(18, socket.MSG_WAITALL)  # NBDMAGIC, IHAVEOPT, handshake flags
            if hello[:16] != NBD_MAGIC + IHAVEOPT:
                return False
            s.sendall(struct.pack(">I", 1) + IHAVEOPT + struct.pack(">II", NBD_OPT_ABORT, 0))
            s.recv(20, socket.MSG_WAITALL)  # the ACK (or nothing: either is fine)
            return True
    except OSError:
        return False
