"""Encrypted volumes' keys: data keys, their wrapping, and the keyring of unlocked keys.

The data key of an encrypted volume is 64 random bytes: AES-256-XTS's two 256-bit keys, used by
the C pool seam (native/xm_crypt.c; 4 KiB data units, tweak = the logical block number, or the
physical one for legacy volumes).  It never reaches the store's files: only its wrapped form
does, in the volume record's `encryption` field (VOLUMES, JSON; catalog.VolumeRecord), together
with the parameters needed to unwrap it:

    {"version": 1,
     "cipher": "aes-256-xts-plain64",          # XTS on 4 KiB units, a u64 block number as tweak
     "data_unit": 4096,                        # bytes per XTS data unit: one pool block
     "tweak": "lba",                           # the logical block number (lba / 4096); absent:
                                               # the physical one (legacy, format 2 volumes)
     "key_id": "<32 hex>",                     # random; a volume and its clones share it
     "kek": {"kind": "passphrase", "kdf": "scrypt", "salt": "<b64, 16 B>",
             "n": 65536, "r": 8, "p": 1}       # or {"kind": "key-file"}: the file's 32 bytes
     "wrap": "aes-256-gcm",
     "nonce": "<b64, 12 B>",
     "wrapped": "<b64, 64 B key + 16 B tag>"}

The key-encryption key (KEK) is scrypt(passphrase, salt, n, r, p) -> 32 bytes, or the 32 bytes
of a key file.  The data key is wrapped with AES-256-GCM under the KEK, with a fresh random
nonce, and with every other field of the record (canonical JSON, "wrapped" and "nonce" left
out) as associated data: a wrong passphrase or key file, a truncated or tampered wrapped key,
and tampered parameters (the tweak mode too) all fail the tag check and raise errors.BadKey,
and nothing changes.  The tweak mode belongs to the data key: every volume sharing a key id
has the same one (clones and `snapshot copy` without --encrypt copy the record), and rotation
keeps it.  A record travels whole in a send stream or a backup manifest of an encrypted volume
(raw send): it is what unlocking needs, and it holds no key in the clear.
scrypt parameters outside sane bounds are refused before deriving (a tampered n must not make
the server allocate gigabytes).  Rotation unwraps with the old secret and wraps the same data
key under the new one (fresh salt and nonce), then rewrites the records of every volume with
that key id in one LMDB write transaction: a crash leaves the old or the new secret working.

Defaults: scrypt n=2**16, r=8, p=1 (64 MiB, ~0.5-1 s on this project's 2-core test machine).
SNAPDISK_SCRYPT_LOG2N overrides log2(n) for new wraps (the tests use 10); the parameters are
stored beside each wrapped key, so old records keep theirs.  Argon2id is not used: the
`cryptography` that nbdkit's embedded Python sees (Debian 12's, 38.x) does not have it.

Python copies of key material: the keyring keeps each data key in a bytearray and zeroes it on
lock and close; intermediate `bytes` from the cryptography package cannot be wiped (a limit of
Python, stated in docs/encryption.md).  No key material is logged or put in an exception.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import errors

CIPHER = "aes-256-xts-plain64"
DATA_UNIT = 4096  # native/xm_crypt.c
TWEAK_LBA, TWEAK_PBN = "lba", "pbn"  # the record's "tweak" (absent: TWEAK_PBN, legacy)
DATA_KEY_BYTES = 64
KEK_BYTES = 32
KEY_FILE_BYTES = 32
RECORD_VERSION = 1
DEFAULT_LOG2N = 16
SCRYPT_R, SCRYPT_P = 8, 1
# Bounds on stored scrypt parameters (128 * r * n bytes of memory).
MAX_LOG2N, MAX_R, MAX_P = 20, 16, 4
# Rate limit of wrong secrets, per key id: the k-th failure in a row costs
# min(FAIL_DELAY * 2**(k-1), FAIL_DELAY_MAX) seconds before the error is returned, and attempts
# on one key are serialized, so parallel guesses queue behind it.
FAIL_DELAY, FAIL_DELAY_MAX = 0.25, 16.0


@dataclass(frozen=True, repr=False)
class Secret:
    """A passphrase or a key file's content: what unlocks a wrapped key.  repr shows neither."""

    passphrase: bytes | None = None
    key_file: bytes | None = None

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (self.key_file is None):
            raise errors.InvalidArgument("give a passphrase or a key file (one of them)")
        if self.passphrase is not None and not self.passphrase:
            raise errors.InvalidArgument("empty passphrase")
        if self.key_file is not None and len(self.key_file) != KEY_FILE_BYTES:
            raise errors.BadKey(f"a key file holds exactly {KEY_FILE_BYTES} bytes "
                                f"(this one: {len(self.key_file)})")

    def __repr__(self) -> str:
        return f"Secret({'passphrase' if self.passphrase is not None else 'key file'})"

    @classmethod
    def from_args(cls, args: dict[str, Any], prefix: str = "") -> Secret:
        """From control-op arguments {prefix}passphrase (str) / {prefix}key_hex (str)."""
        pw, kh = args.get(prefix + "passphrase"), args.get(prefix + "key_hex")
        try:
            key = bytes.fromhex(kh) if isinstance(kh, str) else None
        except ValueError:
            raise errors.BadKey("the key file's content is not valid") from None
        return cls(pw.encode() if isinstance(pw, str) else None, key)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(s), validate=True)
    except ValueError:
        raise errors.BadKey(f"the wrapped key record is damaged ({what})") from None


def _log2n() -> int:
    raw = os.environ.get("SNAPDISK_SCRYPT_LOG2N")
    return int(raw) if raw and raw.isdigit() and 1 <= int(raw) <= MAX_LOG2N else DEFAULT_LOG2N


def _kek_params(secret: Secret) -> dict[str, Any]:
    if secret.key_file is not None:
        return {"kind": "key-file"}
    return {"kind": "passphrase", "kdf": "scrypt", "salt": _b64(secrets.token_bytes(16)),
            "n": 1 << _log2n(), "r": SCRYPT_R, "p": SCRYPT_P}


def _derive(secret: Secret, kek: dict[str, Any]) -> bytes:
    kind = kek.get("kind")
    if kind == "key-file":
        if secret.key_file is None:
            raise errors.BadKey("this volume's key is wrapped by a key file, not a passphrase")
        return secret.key_file
    if kind != "passphrase" or kek.get("kdf") != "scrypt":
        raise errors.BadKey(f"unknown key-encryption scheme {kind!r}")
    if secret.passphrase is None:
        raise errors.BadKey("this volume's key is wrapped by a passphrase, not a key file")
    n, r, p = kek.get("n"), kek.get("r"), kek.get("p")
    if not (isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
            and 2 <= n <= 1 << MAX_LOG2N and n & (n - 1) == 0 and 1 <= r <= MAX_R
            and 1 <= p <= MAX_P):
        raise errors.BadKey("the wrapped key record's scrypt parameters are out of bounds")
    salt = _unb64(kek.get("salt"), "salt")
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt  # imported when used: 50 ms
    return Scrypt(salt=salt, length=KEK_BYTES, n=n, r=r, p=p).derive(secret.passphrase)


def _aad(rec: dict[str, Any]) -> bytes:
    head = {k: v for k, v in rec.items() if k not in ("nonce", "wrapped")}
    return json.dumps(head, sort_keys=True, separators=(",", ":")).encode()


def new_data_key() -> bytearray:
    while True:
        key = bytearray(secrets.token_bytes(DATA_KEY_BYTES))
        if key[:32] != key[32:]:  # XTS refuses equal halves (never happens in practice)
            return key


def tweak_mode(rec: dict[str, Any]) -> str:
    """TWEAK_LBA or TWEAK_PBN (no "tweak": a legacy record); BadKey for anything else."""
    mode = rec.get("tweak", TWEAK_PBN)
    if mode not in (TWEAK_LBA, TWEAK_PBN):
        raise errors.BadKey("the wrapped key record is damaged or of an unknown version (tweak)")
    return str(mode)


def wrap(data_key: bytearray, secret: Secret, key_id: str | None = None,
         tweak: str = TWEAK_LBA) -> dict[str, Any]:
    """A new key record for data_key under secret (fresh salt and nonce).  tweak: TWEAK_LBA
    for every new key; TWEAK_PBN (the field left out) only to rewrap a legacy volume's key."""
    rec: dict[str, Any] = {"version": RECORD_VERSION, "cipher": CIPHER, "data_unit": DATA_UNIT,
                           "key_id": key_id or secrets.token_hex(16),
                           "kek": _kek_params(secret), "wrap": "aes-256-gcm"}
    if tweak == TWEAK_LBA:
        rec["tweak"] = TWEAK_LBA
    elif tweak != TWEAK_PBN:
        raise errors.InvalidArgument(f"tweak mode {tweak!r}")
    nonce = secrets.token_bytes(12)
    kek = _derive(secret, rec["kek"])
    rec["nonce"] = _b64(nonce)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    rec["wrapped"] = _b64(AESGCM(kek).encrypt(nonce, bytes(data_key), _aad(rec)))
    return rec


def _known_kind(rec: Any) -> bool:
    """A record of this version, cipher, data unit and wrap: what unwrap and record_problem
    both require before anything else."""
    return isinstance(rec, dict) and rec.get("version") == RECORD_VERSION \
        and rec.get("cipher") == CIPHER and rec.get("data_unit") == DATA_UNIT \
        and rec.get("wrap") == "aes-256-gcm"


def unwrap(rec: dict[str, Any], secret: Secret) -> bytearray:
    """The data key of rec; errors.BadKey for a wrong secret or a damaged record."""
    if not _known_kind(rec) or not isinstance(rec.get("kek"), dict):
        raise errors.BadKey("the wrapped key record is damaged or of an unknown version")
    tweak_mode(rec)
    kek = _derive(secret, rec["kek"])
    nonce = _unb64(rec.get("nonce"), "nonce")
    wrapped = _unb64(rec.get("wrapped"), "wrapped key")
    if len(nonce) != 12:
        raise errors.BadKey("the wrapped key record is damaged (nonce)")
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    try:
        key = bytearray(AESGCM(kek).decrypt(nonce, wrapped, _aad(rec)))
    except InvalidTag:
        raise errors.BadKey("wrong passphrase or key file, or a damaged wrapped key") from None
    if len(key) != DATA_KEY_BYTES:
        raise errors.BadKey("the wrapped key record is damaged (key length)")
    return key


def public_info(rec: dict[str, Any]) -> dict[str, Any]:
    """What `key info` shows: cipher, KDF and parameters, key id; never the key or its wrap."""
    kek = rec.get("kek") or {}
    return {"cipher": rec.get("cipher"), "data_unit": rec.get("data_unit"),
            "tweak": rec.get("tweak", TWEAK_PBN),
            "key_id": rec.get("key_id"), "wrap": rec.get("wrap"),
            "kek": {k: v for k, v in kek.items() if k != "salt"}}


KEY_ID_RE = re.compile(r"[0-9a-f]{32}")


def record_problem(rec: Any) -> str | None:
    """What is wrong with a key record received from elsewhere (a stream, a backup), checked
    without any secret: None if it is one this snapdisk can unlock with the sender's secret.
    Only lba-tweak records travel (a pbn one is bound to the sender's pool)."""
    if not isinstance(rec, dict):
        return "not a key record"
    if not _known_kind(rec):
        return "a key record of an unknown version or cipher"
    if rec.get("tweak") != TWEAK_LBA:
        return f"tweak mode {rec.get('tweak', TWEAK_PBN)!r} (only 'lba' records travel)"
    if not isinstance(rec.get("key_id"), str) or not KEY_ID_RE.fullmatch(rec["key_id"]):
        return "a bad key id"
    kek = rec.get("kek")
    if not isinstance(kek, dict) or kek.get("kind") not in ("passphrase", "key-file"):
        return "an unknown key-encryption scheme"
    for field, n in (("nonce", 12), ("wrapped", DATA_KEY_BYTES + 16)):
        try:
            if len(base64.b64decode(str(rec.get(field)), validate=True)) != n:
                return f"a bad {field}"
        except ValueError:
            return f"a bad {field}"
    return None


class Throttle:
    """Per-key-id serialization and exponential delay of wrong secrets (see FAIL_DELAY)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._fails: dict[str, int] = {}

    def lock(self, key_id: str) -> threading.Lock:
        with self._mu:
            return self._locks.setdefault(key_id, threading.Lock())

    def failed(self, key_id: str) -> None:
        """Call holding lock(key_id): sleeps the penalty."""
        with self._mu:
            k = self._fails[key_id] = self._fails.get(key_id, 0) + 1
        time.sleep(min(FAIL_DELAY * 2 ** (k - 1), FAIL_DELAY_MAX))

    def succeeded(self, key_id: str) -> None:
        with self._mu:
            self._fails.pop(key_id, None)


class Keyring:
    """Unlocked data keys of this process, by key id (bytearrays, zeroed when dropped)."""

    def __init__(self) -> None:
        self._keys: dict[str, bytearray] = {}
        self.throttle = Throttle()

    def get(self, key_id: str) -> bytearray | None:
        return self._keys.get(key_id)

    def put(self, key_id: str, key: bytearray) -> None:
        old = self._keys.get(key_id)
        if old is not None and old is not key:
            _zero(old)
        self._keys[key_id] = key

    def drop(self, key_id: str) -> None:
        key = self._keys.pop(key_id, None)
        if key is not None:
            _zero(key)

    def clear(self) -> None:
        for key_id in list(self._keys):
            self.drop(key_id)

    def ids(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys


def _zero(b: bytearray) -> None:
    b[:] = bytes(len(b))
