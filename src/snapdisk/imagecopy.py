"""`snapdisk export VOL@SNAP FILE` and `snapdisk import FILE VOL` (issue 13): disk images in and
out, raw or qcow2, through `qemu-img convert` over snapdisk's own NBD exports.

Why qemu-img over NBD rather than reading the store: the export is the one reader every tool
agrees with (block status gives the holes, so qemu-img skips them; an encrypted volume is
decrypted by the pool seam like any client read), and qemu-img owns the image formats.  This
module only probes, runs and watches it:

- export: the snapshot's export (`VOL@ID`, the snapshot's numeric id, so no name needs URI
  quoting) is converted into `.FILE.snapdisk-part` beside FILE, then renamed over FILE: a failed
  or cancelled export leaves no file; an existing FILE is refused unless `overwrite`.  Holes
  stay holes (qemu-img reads NBD block status: unallocated qcow2 clusters, a sparse raw file).
- import: `qemu-img info` reads the image first (format auto-detected unless given; only raw
  and qcow2; an image with a backing file or an external data file is refused, since
  converting it would read other host files), the volume is made with the image's virtual size
  rounded up to 4 KiB, then `qemu-img convert -n --target-is-zero` writes into its live export:
  `-n` because the target exists, `--target-is-zero` because a new volume reads as zeros, so
  zero runs of the image are skipped and stay holes (qemu-img's default `-S 4k` also finds the
  4 KiB zero blocks of a raw image).  On any failure or cancel the new volume is deleted.
  A qcow2 image is checked first (`qemu-img check`): a cut or damaged one opens and reads as
  zeros where its tables point past the end, which would import silently wrong.  A raw image
  is any file (any bytes are a raw disk): only its size can be judged.

Progress: `qemu-img convert -p` prints "(12.34/100%)" lines ending in '\\r' on stdout; they
are turned into progress(done_bytes, total_bytes) calls, which also carry cancellation (a
job's progress raises errors.Cancelled: qemu-img is then killed and waited for).  While qemu-img
prints nothing, the last figure is reported again every 0.25 s so that a cancel is seen.

These functions run inside the server (control/image_ops.py: the ops need its NBD socket);
offline, the CLI starts a temporary server on a private socket first (cli/image_cmds.py).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import errors, keys
from .listen import export_uri

if TYPE_CHECKING:
    from .engine import Engine

Progress = Callable[[int, int], None]

FORMATS = ("raw", "qcow2")
BLOCK = 4096
QEMU_IMG = "qemu-img"
PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
POLL_S = 0.25


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _qemu_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1].removeprefix("qemu-img: ") if lines else "no message"


def _check_summary(c: subprocess.CompletedProcess[str]) -> str:
    try:
        data = json.loads(c.stdout)
        return f"{data.get('corruptions', data.get('check-errors', '?'))} error(s)"
    except ValueError:
        return _qemu_error(c.stderr)


def probe(path: str, fmt: str | None = None) -> ImageInfo:
    """What qemu-img says of the image at path: InvalidArgument for a file it cannot read as
    an image, Unsupported for other formats, backing files and external data files."""
    if fmt is not None and fmt not in FORMATS:
        raise errors.InvalidArgument(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise errors.NotFound(f"{path}: no such file")
    argv = [QEMU_IMG, "info", "--output=json", *(["-f", fmt] if fmt else []), path]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise errors.InvalidArgument(f"{path}: not an image qemu-img can read "
                                     f"({_qemu_error(r.stderr)})")
    try:
        data = json.loads(r.stdout)
        found, size = str(data["format"]), int(data["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise errors.InvalidArgument(f"{path}: qemu-img info gave no format and size") from None
    if found not in FORMATS:
        raise errors.Unsupported(f"{path} is a {found} image: import takes {' or '.join(FORMATS)} "
                                 f"(convert it first: qemu-img convert -O qcow2 ...)")
    if data.get("backing-filename") or data.get("full-backing-filename"):
        raise errors.Unsupported(f"{path} has a backing file: make a standalone image first "
                                 "(qemu-img convert -O qcow2 IMAGE STANDALONE)")
    spec = (data.get("format-specific") or {}).get("data") or {}
    if spec.get("data-file"):
        raise errors.Unsupported(f"{path} keeps its data in an external file: make a "
                                 "standalone image first")
    if spec.get("corrupt"):
        raise errors.InvalidArgument(f"{path}: qemu-img marks the image corrupt "
                                     "(qemu-img check -r all repairs it)")
    if size <= 0:
        raise errors.InvalidArgument(f"{path}: the image is empty (virtual size {size})")
    if found == "qcow2":  # a cut or damaged qcow2 opens and reads as zeros: check it first
        c = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", "--output=json", path],
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if c.returncode not in (0, 3):  # 3: leaked clusters only, the data is intact
            raise errors.InvalidArgument(f"{path}: qemu-img check finds the qcow2 image "
                                         f"damaged (exit {c.returncode}: {_check_summary(c)})")
    actual = data.get("actual-size")
    return ImageInfo(path, found, size, int(actual) if actual is not None else None)


def convert(argv: list[str], total: int, progress: Progress | None) -> None:
    """Run `qemu-img convert -p ...` to its end, reporting its percentage as bytes of total.
    A Cancelled (or any exception) from progress kills qemu-img; its failure is ServerError
    with qemu-img's last message."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    fd, buf, done = proc.stdout.fileno(), b"", 0
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                for line in lines:
                    m = PERCENT.search(line)
                    if m:  # 100 % is reported by the caller once qemu-img has succeeded
                        done = min(int(float(m.group(1)) * total / 100), max(total - 1, 0))
            if progress is not None:
                progress(done, total)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    if rc != 0:
        raise errors.ServerError(f"qemu-img convert failed: "
                                 f"{_qemu_error(b''.join(err).decode(errors='replace'))}")


def _uri(nbd_socket: str, export: str) -> str:
    return export_uri(f"unix:{nbd_socket}", export)


def export_snapshot(engine: Engine, volume: str, snap: str | int, path: str, fmt: str,
                    nbd_socket: str, overwrite: bool = False,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Write snapshot volume@snap to path as a raw or qcow2 image, through its NBD export."""
    if fmt not in FORMATS:
        raise errors.InvalidArgument(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    if not os.path.isabs(path):
        raise errors.InvalidArgument(f"{path}: the image path must be absolute")
    info = engine.snapshot_info(volume, snap)
    vinfo = engine.volume_info(volume)
    if vinfo.locked:
        raise errors.BadKey(f"volume {volume!r} is encrypted and locked: export reads its "
                            f"plaintext through the export, unlock it first "
                            f"(snapdisk key unlock {volume})")
    if os.path.lexists(path) and not overwrite:
        raise errors.AlreadyExists(f"{path} exists (overwrite it with --force)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise errors.NotFound(f"{parent}: no such directory")
    part = os.path.join(parent, f".{os.path.basename(path)}.snapdisk-part")
    uri = _uri(nbd_socket, f"{volume}@{info.id}")
    t0 = time.monotonic()
    try:
        convert([QEMU_IMG, "convert", "-p", "-f", "raw", "-O", fmt, uri, part],
                info.size_bytes, progress)
        os.replace(part, path)
    finally:
        if os.path.lexists(part):
            os.unlink(part)
    st = os.stat(path)
    return {"volume": volume, "snapshot": info.name, "snapshot_id": info.id, "file": path,
            "format": fmt, "virtual_size": info.size_bytes, "file_bytes": st.st_size,
            "allocated_bytes": st.st_blocks * 512,
            "seconds": round(time.monotonic() - t0, 3)}


def import_volume(engine: Engine, path: str, name: str, fmt: str | None, nbd_socket: str,
                  encrypt: keys.Secret | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """A new volume `name` holding the image at path (raw or qcow2); deleted again if the
    copy fails or is cancelled."""
    if not os.path.isabs(path):
        raise errors.InvalidArgument(f"{path}: the image path must be absolute")
    image = probe(path, fmt)
    size = -(-image.virtual_size // BLOCK) * BLOCK
    engine.create_volume(name, size, encrypt=encrypt)  # AlreadyExists: nothing to undo
    t0 = time.monotonic()
    try:
        convert([QEMU_IMG, "convert", "-p", "-n", "--target-is-zero", "-f", image.format,
                 "-O", "raw", path, _uri(nbd_socket, name)], image.virtual_size, progress)
    except BaseException:
        engine.delete_volume(name)  # never a half-made volume
        raise
    v = engine.volume_info(name).to_dict()
    return {**v, "file": path, "format": image.format, "virtual_size": image.virtual_size,
            "seconds": round(time.monotonic() - t0, 3)}
