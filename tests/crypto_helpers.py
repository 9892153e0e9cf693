"""What the encrypted-volume tests share: a known plaintext, a secret, a store with an encrypted
volume, and the scan for plaintext under a directory."""

from __future__ import annotations

import os
import random
from pathlib import Path

from snapdisk import keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

BS = 4096
MiB = 1 << 20
PW = keys.Secret(passphrase=b"open sesame")
PATTERN = random.Random(11).randbytes(2 * BS)  # incompressible, no runs

def plaintext_hits(root: str, pattern: bytes) -> list[str]:
    """Files under root holding any 16-byte window of pattern.  Any such window contains an
    8-byte window of pattern at an 8-aligned file offset: look those up, then confirm."""
    eights = {pattern[i:i + 8]: i for i in range(len(pattern) - 7)}
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = _data_regions(f)
            if _has_window(data, pattern, eights):
                hits.append(path)
    return hits


def _data_regions(f: object) -> bytes:
    fd = f.fileno()  # type: ignore[attr-defined]
    size = os.fstat(fd).st_size
    out, pos = bytearray(), 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % 8
        out += b"\0" * 16 + os.pread(fd, end - start, start)  # keep 8-alignment
        pos = end
    return bytes(out)


def _has_window(data: bytes, pattern: bytes, eights: dict[bytes, int]) -> bool:
    mv = memoryview(data)
    for off in range(0, len(data) - 7, 8):
        if bytes(mv[off:off + 8]) in eights:
            for j in range(max(0, off - 8), off + 1):
                if data[j:j + 16] and data[j:j + 16] in pattern and len(data[j:j + 16]) == 16:
                    return True
    return False


def make_encrypted_store(path: Path) -> str:
    with Engine.create(str(path), StoreConfig(pool_bytes=128 * MiB)) as e:
        e.create_volume("sec", 16 * MiB, encrypt=PW)
        e.create_volume("plain", MiB)
    return str(path)



def make_legacy(engine: Engine, name: str, secret: keys.Secret = PW) -> None:
    """Make the just-created, still EMPTY and unlocked encrypted volume `name` a legacy one
    (format 2's pbn tweak): its key record rewrapped without "tweak", the key reloaded into the
    seam.  What a volume encrypted before format 3 looks like (raw send refuses it)."""
    from snapdisk import catalog
    with engine.native.txn(write=True) as t:
        vol = catalog.vol_id(t, name)
        vr = catalog.vol_record(t, vol)
        assert vr.encryption is not None and engine.volume_info(name).live_bytes == 0
        key = engine.keyring.get(vr.encryption["key_id"])
        assert key is not None, "unlock it first"
        vr.encryption = keys.wrap(key, secret, vr.encryption["key_id"], keys.TWEAK_PBN)
        catalog.put_vol_record(t, vol, vr)
    engine.keys.load([vol])
    assert engine.key_info(name)["tweak"] == "pbn"
