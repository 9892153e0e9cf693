"""Encrypted volumes on an open store: create, unlock, lock, rotate, info (the Engine's part).

The key record lives in the volume record's `encryption` field (catalog.VolumeRecord; format in
keys.py) and the VOLSTATE flag VS_ENCRYPTED tells the pool seam that the volume's blocks are
ciphertext: volume.configure marks such a volume LOCKED in C unless its key is loaded.  A
volume and its clones share one data key (clones share blocks) and so one key id: unlock,
lock and rotate act on every volume with the key id of the one named.  Unlocked data keys live
in the Engine's keyring (keys.Keyring) and in the seam's OpenSSL contexts, nowhere else.

The XTS tweak mode is the record's ("tweak": "lba" for every volume encrypted since store
format 3; absent: the legacy pbn): the seam is told it with the key (VolumeKeys.load).  A
received or restored encrypted volume (raw send: sendrecv.py, backup_restore.py) takes the
sender's record as is (adopt): it unlocks with the sender's passphrase or key file.
"""

from __future__ import annotations

from typing import Any

from . import catalog, errors, keys
from .layout import BLOCK_SIZE, VS_ENCRYPTED
from .native import KEY_UNLOCKED, NativeStore, Txn, vol_set_tweak

COPY_HINT = ("encrypting or decrypting a volume in place is not supported: copy a snapshot "
             "into a new volume with `snapdisk snapshot copy VOL@SNAP NEWVOL --encrypt` "
             "(or --decrypt)")


# ---- raw send and backup: what of a key record travels (sendrecv.py, backup.py) --------------

LEGACY_HINT = (
    "its AES-XTS tweak is the physical block number (encrypted before store format 3; "
    "docs/encryption.md), so its ciphertext is bound to this store's pool and means nothing "
    "anywhere else.  Convert it once: `snapdisk snapshot copy {v}@SNAP NEWVOL --encrypt` "
    "makes a volume under a new key whose tweak is the logical block, which is sent raw; or "
    "send a plain copy (`snapdisk snapshot copy {v}@SNAP NEWVOL --decrypt`)")


def travel_meta(rec: dict[str, Any] | None, volume: str, size: int) -> dict[str, Any] | None:
    """What a raw stream (or backup manifest) of an encrypted volume carries of its key
    record; None for a plain volume; Unsupported for one that cannot travel raw."""
    if rec is None:
        return None
    if not tweak_lba(rec):
        raise errors.Unsupported(f"volume {volume!r} is a legacy encrypted volume and cannot "
                                 f"be sent or backed up raw: {LEGACY_HINT.format(v=volume)}")
    if size % BLOCK_SIZE:
        raise errors.Unsupported(
            f"volume {volume!r} is encrypted and its snapshot is {size} bytes, not whole "
            f"{BLOCK_SIZE}-byte blocks: raw transfer carries whole XTS data units (grow the "
            "volume to a multiple of 4 KiB and take a new snapshot)")
    return {"cipher": rec.get("cipher"), "tweak": keys.TWEAK_LBA, "key_id": rec.get("key_id"),
            "record": dict(rec)}


def received_record(enc: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    """The key record of a received raw stream's (or backup's) `encryption`, checked without
    any secret; FormatError naming what is wrong."""
    if enc is None:
        return None
    rec = enc.get("record")
    problem = keys.record_problem(rec)
    if problem is None and (enc.get("key_id") != rec.get("key_id")  # type: ignore[union-attr]
                            or enc.get("cipher") != rec.get("cipher")  # type: ignore[union-attr]
                            or enc.get("tweak") != keys.TWEAK_LBA):
        problem = "its cipher, tweak or key id disagrees with its key record"
    if problem is not None:
        raise errors.FormatError(f"{what}: the encryption it names is unusable ({problem})")
    return dict(rec)  # type: ignore[arg-type]


def same_key(volume: str, have: dict[str, Any] | None, rec: dict[str, Any] | None,
              sent: str) -> None:
    """An incremental stream (sent) applies onto a volume encrypted the same way: plain onto
    plain, or ciphertext under the same key id (the same data key, tweak mode lba)."""
    def says(r: dict[str, Any] | None) -> str:
        return "plain" if r is None else f"encrypted under key id {r.get('key_id')}"
    if (have is None) != (rec is None) or (have is not None and rec is not None and (
            have.get("key_id") != rec.get("key_id") or not tweak_lba(have))):
        raise errors.InvalidArgument(
            f"cannot receive {sent}: the stream is {says(rec)}, but volume {volume!r} is "
            f"{says(have)}" + ("" if have is None or tweak_lba(have)
                               else " (a legacy, pbn-tweak volume)")
            + "; an incremental stream applies only onto a volume with the same key")


# ---- records of this store -------------------------------------------------------------------

def record(t: Txn, vol: int) -> dict[str, Any] | None:
    return catalog.vol_record(t, vol).encryption


def sharing(t: Txn, key_id: str) -> list[int]:
    """The ids of the volumes whose data key is key_id."""
    out = []
    for v in catalog.volume_ids(t):
        rec = catalog.vol_record(t, v).encryption
        if rec is not None and rec.get("key_id") == key_id:
            out.append(v)
    return out


def init_new(t: Txn, vs: catalog.VolState, secret: keys.Secret, keyring: keys.Keyring) -> None:
    """Make the just-created volume vs encrypted, under a new data key wrapped by secret; the
    key goes into the keyring (the creator holds it: the volume starts unlocked)."""
    data_key = keys.new_data_key()
    rec = keys.wrap(data_key, secret)
    vr = catalog.vol_record(t, vs.vol)
    vr.encryption = rec
    catalog.put_vol_record(t, vs.vol, vr)
    vs.flags |= VS_ENCRYPTED
    vs.save(t)
    keyring.put(rec["key_id"], data_key)


def adopt(t: Txn, vs: catalog.VolState, rec: dict[str, Any]) -> None:
    """Make the just-created volume vs encrypted under a key record from elsewhere (a raw
    stream or backup, checked by the caller with keys.record_problem): locked here until
    someone unlocks it with the sender's secret."""
    vr = catalog.vol_record(t, vs.vol)
    vr.encryption = dict(rec)
    catalog.put_vol_record(t, vs.vol, vr)
    vs.flags |= VS_ENCRYPTED
    vs.save(t)


def tweak_lba(rec: dict[str, Any] | None) -> bool:
    """Whether an encrypted volume's tweak is the logical block (raw send needs it)."""
    return rec is not None and keys.tweak_mode(rec) == keys.TWEAK_LBA


def inherit(t: Txn, src: int, vs: catalog.VolState) -> None:
    """A clone vs of src (in clone's transaction): the same key record, so the same key."""
    rec = record(t, src)
    if rec is None:
        return
    vr = catalog.vol_record(t, vs.vol)
    vr.encryption = dict(rec)
    catalog.put_vol_record(t, vs.vol, vr)
    vs.flags |= VS_ENCRYPTED


class VolumeKeys:
    """Key operations of one open store."""

    def __init__(self, native: NativeStore, keyring: keys.Keyring):
        self.native = native
        self.keyring = keyring

    def _encrypted(self, t: Txn, name: str) -> tuple[int, dict[str, Any]]:
        vol = catalog.vol_id(t, name)
        rec = record(t, vol)
        if rec is None:
            raise errors.Unsupported(f"volume {name!r} is not encrypted; {COPY_HINT}")
        return vol, rec

    def load(self, vols: list[int]) -> None:
        """Give the seam the keyring's keys of vols (after unlock, create, clone)."""
        with self.native.txn() as t:
            recs = [(v, record(t, v) or {}) for v in vols]
        with self.native.gate_exclusive():
            for v, rec in recs:
                key_id = rec.get("key_id")
                key = self.keyring.get(key_id) if isinstance(key_id, str) else None
                if key is not None:
                    vol_set_tweak(self.native, v, tweak_lba(rec))  # before the key
                    self.native.vol_set_key(v, key)

    def unlock(self, name: str, secret: keys.Secret) -> dict[str, Any]:
        with self.native.txn() as t:
            vol, rec = self._encrypted(t, name)
        key_id = str(rec.get("key_id"))
        with self.keyring.throttle.lock(key_id):
            try:
                data_key = keys.unwrap(rec, secret)
            except errors.BadKey:
                self.keyring.throttle.failed(key_id)
                raise
            self.keyring.throttle.succeeded(key_id)
            self.keyring.put(key_id, data_key)
        with self.native.txn() as t:
            vols = sharing(t, key_id)
        self.load(vols)
        return self.info(name)

    def forget_unused(self) -> None:
        """Drop (zero) the keyring's keys no volume uses any more (after a delete)."""
        with self.native.txn() as t:
            used = {(record(t, v) or {}).get("key_id") for v in catalog.volume_ids(t)}
        for key_id in self.keyring.ids():
            if key_id not in used:
                self.keyring.drop(key_id)

    def key_vols(self, name: str) -> list[int]:
        """The volumes sharing name's key (what lock must disconnect)."""
        with self.native.txn() as t:
            _, rec = self._encrypted(t, name)
            return sharing(t, str(rec.get("key_id")))

    def lock(self, name: str) -> dict[str, Any]:
        """Wipe the key of name (and of the volumes sharing it) from memory.  The caller has
        disconnected their clients (control ops: Registry.reserve)."""
        with self.native.txn() as t:
            _, rec = self._encrypted(t, name)
            vols = sharing(t, str(rec.get("key_id")))
        with self.native.gate_exclusive():
            for v in vols:
                self.native.vol_lock(v)
            self.keyring.drop(str(rec.get("key_id")))
        return self.info(name)

    def rotate(self, name: str, old: keys.Secret, new: keys.Secret) -> dict[str, Any]:
        """Rewrap the data key under new (O(volumes sharing it), no data touched), in one
        LMDB write transaction: a crash leaves the old or the new secret working."""
        with self.native.txn() as t:
            _, rec = self._encrypted(t, name)
        key_id = str(rec.get("key_id"))
        with self.keyring.throttle.lock(key_id):
            try:
                data_key = keys.unwrap(rec, old)
            except errors.BadKey:
                self.keyring.throttle.failed(key_id)
                raise
            self.keyring.throttle.succeeded(key_id)
            try:
                new_rec = keys.wrap(data_key, new, key_id, keys.tweak_mode(rec))
            finally:
                data_key[:] = bytes(len(data_key))
            with self.native.txn(write=True) as t:
                _, now = self._encrypted(t, name)
                if now != rec:
                    raise errors.Busy(f"volume {name!r}'s key changed meanwhile: try again")
                for v in sharing(t, key_id):
                    vr = catalog.vol_record(t, v)
                    vr.encryption = dict(new_rec)
                    catalog.put_vol_record(t, v, vr)
        return self.info(name)

    def info(self, name: str) -> dict[str, Any]:
        with self.native.txn() as t:
            vol = catalog.vol_id(t, name)
            rec = record(t, vol)
            if rec is None:
                return {"volume": name, "encrypted": False}
            others = [catalog.vol_record(t, v).name for v in sharing(t, str(rec.get("key_id")))]
        return {"volume": name, "encrypted": True, "locked": self.locked(vol),
                **keys.public_info(rec), "volumes": sorted(others)}

    def locked(self, vol: int) -> bool:
        """True for an encrypted volume whose key is not loaded."""
        with self.native.txn() as t:
            if not catalog.state(t, vol).flags & VS_ENCRYPTED:
                return False
        return self.native.vol_key_state(vol) != KEY_UNLOCKED
