"""`snapdisk key unlock|lock|rotate|info` and the secret options of `volume create --encrypt`.

Secrets come from files (--passphrase-file: its text, one trailing newline dropped;
--key-file: exactly 32 bytes) or, with neither and a terminal, from getpass prompts (twice for
a new passphrase).  They go to the server (or the local backend) in the request only, as
`passphrase` / `key_hex` (see control/key_ops.py), and are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from .. import errors
from .context import Context, Result
from .parsing import add_command, add_group
from .render import fields

KEY_FILE_BYTES = 32


def add_secret_args(p: argparse.ArgumentParser, new: bool = False) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passphrase-file", metavar="FILE",
                   help="read the passphrase from FILE (one trailing newline is dropped)")
    g.add_argument("--key-file", metavar="FILE", help="a file of exactly 32 random bytes")
    if new:
        g2 = p.add_mutually_exclusive_group()
        g2.add_argument("--new-passphrase-file", metavar="FILE", help="the new passphrase")
        g2.add_argument("--new-key-file", metavar="FILE", help="the new 32-byte key file")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read {path}: {e.strerror}") from None


def _prompt(what: str, confirm: bool) -> str:
    if not sys.stdin.isatty():
        raise errors.InvalidArgument(f"no {what} given: use --passphrase-file FILE or "
                                     "--key-file FILE (or run on a terminal to be prompted)")
    pw = getpass.getpass(f"{what}: ")
    if confirm and getpass.getpass(f"{what} (again): ") != pw:
        raise errors.InvalidArgument("the two passphrases differ")
    if not pw:
        raise errors.InvalidArgument("empty passphrase")
    return pw


def secret(passphrase_file: str | None, key_file: str | None, what: str, confirm: bool,
           prefix: str = "") -> dict[str, Any]:
    """The request arguments for one secret: {prefix}passphrase or {prefix}key_hex."""
    if key_file is not None:
        raw = _read(key_file)
        if len(raw) != KEY_FILE_BYTES:
            raise errors.BadKey(f"{key_file}: a key file holds exactly {KEY_FILE_BYTES} bytes")
        return {prefix + "key_hex": raw.hex()}
    if passphrase_file is not None:
        raw = _read(passphrase_file)
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise errors.InvalidArgument(f"{passphrase_file}: the passphrase is not UTF-8 "
                                         "text (a binary secret is a --key-file)") from None
        return {prefix + "passphrase": text}
    return {prefix + "passphrase": _prompt(what, confirm)}


def show_key(k: dict[str, Any]) -> str:
    if not k.get("encrypted"):
        return fields([("volume", k.get("volume")), ("encrypted", "no")])
    kek = dict(k.get("kek") or {})
    kind = kek.pop("kind", None)
    params = ", ".join(f"{a}={b}" for a, b in kek.items())
    return fields([("volume", k.get("volume")), ("encrypted", "yes"),
                   ("locked", "yes" if k.get("locked") else "no"), ("cipher", k.get("cipher")),
                   ("key id", k.get("key_id")), ("wrapped by", f"{kind} ({params})" if params
                                                  else kind),
                   ("key wrap", k.get("wrap")), ("shared by", ", ".join(k.get("volumes", [])))])


def cmd_key_unlock(a: argparse.Namespace, ctx: Context) -> Result:
    k = ctx.call("key.unlock", volume=a.volume,
                 **secret(a.passphrase_file, a.key_file, "passphrase", False))
    return k, f"unlocked {', '.join(k.get('volumes', [a.volume]))}"


def cmd_key_lock(a: argparse.Namespace, ctx: Context) -> Result:
    k = ctx.call("key.lock", volume=a.volume, force=a.force)
    return k, f"locked {', '.join(k.get('volumes', [a.volume]))}"


def cmd_key_rotate(a: argparse.Namespace, ctx: Context) -> Result:
    args = secret(a.passphrase_file, a.key_file, "current passphrase", False)
    args.update(secret(a.new_passphrase_file, a.new_key_file, "new passphrase", True, "new_"))
    k = ctx.call("key.rotate", volume=a.volume, **args)
    return k, f"rewrapped the key of {', '.join(k.get('volumes', [a.volume]))}"


def cmd_key_info(a: argparse.Namespace, ctx: Context) -> Result:
    k = ctx.call("key.info", volume=a.volume)
    return k, show_key(k)


def register(sub: Any) -> None:
    """The `key` command group."""
    ksub = add_group(sub, "key", "unlock, lock, rotate and describe encrypted volumes' keys")
    p = add_command(ksub, "unlock", cmd_key_unlock, "load an encrypted volume's key", """
        Unwraps the volume's data key with its passphrase or key file and loads it into the
        server: the volume, its snapshots and the clones sharing its key are served again.
        A wrong secret is exit code 14 (bad-key) after a delay that doubles with each wrong
        try.""", """
        snapdisk key unlock web --passphrase-file /run/secrets/web
        snapdisk key unlock web --key-file /etc/snapdisk/web.key""")
    p.add_argument("volume", metavar="VOLUME")
    add_secret_args(p)
    p = add_command(ksub, "lock", cmd_key_lock, "wipe an encrypted volume's key from memory", """
        Its exports (and those of the volumes sharing its key) stop being served.  Refused
        while clients are connected, unless --force, which disconnects them first.""", """
        snapdisk key lock web
        snapdisk key lock web --force""")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--force", action="store_true", help="disconnect connected clients first")
    p = add_command(ksub, "rotate", cmd_key_rotate, "change the passphrase or key file", """
        Rewraps the data key under the new secret (no data is rewritten), atomically: after a
        crash either the old or the new secret works.  Every volume sharing the key (clones)
        follows.""", """
        snapdisk key rotate web --passphrase-file old.txt --new-passphrase-file new.txt
        snapdisk key rotate web --passphrase-file old.txt --new-key-file web.key""")
    p.add_argument("volume", metavar="VOLUME")
    add_secret_args(p, new=True)
    p = add_command(ksub, "info", cmd_key_info, "describe an encrypted volume's key", """
        Cipher, key-wrapping scheme and KDF parameters, key id, lock state and the volumes
        sharing the key; never the key.""", """
        snapdisk key info web --json""")
    p.add_argument("volume", metavar="VOLUME")


# ---- `serve --unlock VOL --passphrase-file F`... ---------------------------------------------

class _UnlockAction(argparse.Action):
    """--unlock VOL starts a pair; the --passphrase-file / --key-file after it completes it."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any,
                 option: str | None = None) -> None:
        pairs = list(getattr(ns, "unlock", None) or [])
        if self.dest == "unlock":
            pairs.append([value, None, None])
        elif not pairs or pairs[-1][1] or pairs[-1][2]:
            parser.error(f"{option} must follow an --unlock VOLUME that has no secret yet")
        else:
            pairs[-1][1 if self.dest == "unlock_passphrase_file" else 2] = value
        ns.unlock = pairs


def add_serve_unlock_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unlock", metavar="VOLUME", action=_UnlockAction, default=[],
                   help="unlock this encrypted volume once serving (repeatable), with the "
                        "--passphrase-file or --key-file that follows it")
    p.add_argument("--passphrase-file", dest="unlock_passphrase_file", metavar="FILE",
                   action=_UnlockAction, help="the passphrase of the --unlock before it")
    p.add_argument("--key-file", dest="unlock_key_file", metavar="FILE", action=_UnlockAction,
                   help="the key file of the --unlock before it")


def serve_secrets(a: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Read the --unlock secrets before the server starts (a missing file fails early)."""
    pairs = getattr(a, "unlock", None) or []
    if pairs and getattr(a, "foreground", False):
        raise errors.InvalidArgument("--unlock needs the background server (the command "
                                     "returns once it serves): with --foreground, run "
                                     "`snapdisk key unlock` after it started")
    return [(vol, secret(pf, kf, f"passphrase of {vol}", False)) for vol, pf, kf in pairs]


def unlock_served(ctx: Context, secrets: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [", ".join(ctx.call("key.unlock", volume=vol, **args).get("volumes", [vol]))
            for vol, args in secrets]


# ---- `snapshot copy VOL@SNAP NEWVOL [--encrypt | --decrypt]` -----------------------------------

def cmd_snapshot_copy(a: argparse.Namespace, ctx: Context) -> Result:
    from .parsing import split_ref
    vol, snap = split_ref(a.ref)
    args: dict[str, Any] = {"encrypt": a.encrypt, "decrypt": a.decrypt,
                            "resume": getattr(a, "resume", False)}
    if a.encrypt:
        args.update(secret(a.passphrase_file, a.key_file, "passphrase", not args["resume"]))
    elif a.passphrase_file or a.key_file:
        args.update(secret(a.passphrase_file, a.key_file, "passphrase", False))
    v = ctx.run_job(f"copy {a.ref} to {a.new}", "snapshot.copy", volume=vol, snapshot=snap,
                    name=a.new, **args)
    enc = "encrypted" if v.get("encrypted") else "plain"
    return v, f"copied {a.ref} to volume {v['name']} ({enc})"


def register_snapshot_copy(ssub: Any) -> None:
    p = add_command(ssub, "copy", cmd_snapshot_copy, "copy a snapshot into a new volume", """
        Reads every allocated block of the snapshot and writes it to a new volume (holes stay
        holes), as a job with progress; Ctrl-C cancels it and deletes the half-made volume.
        --encrypt makes the new volume encrypted under a new key (wrapped by the passphrase or
        key file given, prompted for on a terminal); --decrypt makes it plain (the source must
        be unlocked, or give its passphrase or key file); neither keeps the source's
        encryption (and key).  This is how a volume's encryption changes: never in place.
        After a crash, the same command with --resume continues where the last checkpoint
        (every 16 MiB) left it.""",
                    """
        snapdisk snapshot copy web@monday web-enc --encrypt --passphrase-file pw.txt
        snapdisk snapshot copy web-enc@s1 web-plain --decrypt --key-file web.key""")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("new", metavar="NEWVOLUME")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--encrypt", action="store_true", help="the new volume is encrypted")
    g.add_argument("--decrypt", action="store_true", help="the new volume is plain")
    p.add_argument("--resume", action="store_true",
                   help="continue a copy a crash interrupted (same arguments as the first run)")
    add_secret_args(p)


# ---- `clone VOL@SNAP NEW --new-key [--passphrase-file F | --key-file F]` ----------------------

def add_clone_new_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-key", action="store_true",
                   help="an encrypted clone under a new key: every allocated block is copied "
                        "and re-encrypted (a job), nothing is shared")
    add_secret_args(p)


def cmd_clone_new_key(a: argparse.Namespace, ctx: Context) -> Result:
    """`clone --new-key` is `snapshot copy --encrypt` (snapcopy.py): the blocks cannot be
    shared, since they are encrypted under the origin's key."""
    a.encrypt, a.decrypt = True, False
    return cmd_snapshot_copy(a, ctx)
