"""`snapdisk backup VOL@SNAP s3://BUCKET/PREFIX`, `backup list|verify|prune` and `snapdisk
restore`: backups to S3-compatible object storage (backup.py; docs/backup.md).

`backup` is both a command and a group: `backup list|verify|prune ...` are told apart from
`backup VOL@SNAP URL` by their first word (a VOL@SNAP always has an '@').  Credentials come from
boto3's default chain (AWS_* environment variables, ~/.aws files), read here and sent in the
request (control/backup_ops.py); the endpoint from --endpoint, SNAPDISK_S3_ENDPOINT or
AWS_ENDPOINT_URL.  list, verify and prune need no store: without one they run in this process.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import errors, s3
from .context import Context, Result
from .parsing import add_command, split_ref
from .render import format_size, format_time, table

SUBCOMMANDS = ("list", "verify", "prune")


def _s3_args(a: argparse.Namespace, url: str) -> dict[str, Any]:
    return {"url": url, "endpoint": s3.endpoint(a.endpoint), **s3.caller_credentials()}


def _local(op: str, args: dict[str, Any]) -> Any:
    """list, verify and prune without a store (they touch only the repository)."""
    from .. import backup
    creds = {k: args.pop(k) for k in (*s3.CREDENTIAL_ARGS, "region") if k in args}
    url, endpoint = args.pop("url"), args.pop("endpoint")
    if op == "backup.list":
        return backup.list_backups(url, endpoint, creds)
    if op == "backup.verify":
        return backup.verify(url, args["volume"], args["snapshot"], endpoint, creds)
    return backup.prune(url, args["keep_last"], args["keep_days"], endpoint, creds)


def _run(ctx: Context, desc: str, op: str, job: bool, args: dict[str, Any]) -> Any:
    try:
        return ctx.run_job(desc, op, **args) if job else ctx.call(op, **args)
    except errors.StoreNotFound:
        return _local(op, args)


def _words(a: argparse.Namespace, n: int, usage: str) -> list[str]:
    if len(a.words) != n:
        raise errors.InvalidArgument(f"usage: snapdisk {usage}")
    return list(a.words)


def cmd_backup(a: argparse.Namespace, ctx: Context) -> Result:
    first = a.words[0]
    if first == "list":
        _, url = _words(a, 2, "backup list s3://BUCKET/PREFIX")
        rows = _run(ctx, "", "backup.list", False, _s3_args(a, url))
        return rows, table(
            ["VOLUME", "SNAPSHOT", "SNAPSHOT TAKEN", "SIZE", "MAPPED", "CHUNKS", "BASE"],
            [[b["volume"], b["snapshot"], format_time(b["snapshot_created"]),
              format_size(b["size_bytes"]), format_size(b["mapped_bytes"]), b["chunks"],
              "full" if not b["base"] else "incremental"] for b in rows], right="345")
    if first == "verify":
        _, url, ref = _words(a, 3, "backup verify s3://BUCKET/PREFIX VOL@SNAP")
        vol, snap = split_ref(ref)
        r = _run(ctx, f"verify {ref}", "backup.verify", True,
                 {**_s3_args(a, url), "volume": vol, "snapshot": snap})
        return r, f"backup {ref} is complete: {r['verified_chunks']} chunks checked"
    if first == "prune":
        _, url = _words(a, 2, "backup prune s3://BUCKET/PREFIX --keep-last N | --keep-days D")
        r = _run(ctx, f"prune {url}", "backup.prune", True,
                 {**_s3_args(a, url), "keep_last": a.keep_last, "keep_days": a.keep_days})
        return r, (f"deleted {len(r['deleted_backups'])} backup(s) and {r['deleted_chunks']} "
                   f"chunk(s); kept {len(r['kept_backups'])} backup(s)")
    ref, url = _words(a, 2, "backup VOL@SNAP s3://BUCKET/PREFIX")
    vol, snap = split_ref(ref)
    r = ctx.run_job(f"back up {ref}", "backup", volume=vol, snapshot=snap, resume=a.resume,
                    **_s3_args(a, url))
    if r.get("already_backed_up"):
        return r, f"{ref} is backed up already ({r['name']})"
    kind = "incremental" if r.get("base") else "full"
    return r, (f"backed up {ref} ({kind}): {format_size(r['changed_bytes'])} read, "
               f"{r['uploaded_chunks']} new chunk(s), {format_size(r['uploaded_bytes'])} "
               f"uploaded ({format_size(r['stored_bytes'])} stored), "
               f"{r['seconds']:.1f} s")


def cmd_restore(a: argparse.Namespace, ctx: Context) -> Result:
    vol, snap = split_ref(a.ref)
    r = ctx.run_job(f"restore {a.ref} to {a.new}", "restore", volume=vol, snapshot=snap,
                    name=a.new, **_s3_args(a, a.url))
    return r, (f"restored {a.ref} to volume {r['name']} "
               f"(snapshot {r['backup']['snapshot']}), {format_size(r['fetched_bytes'])} fetched")


ENV_TEXT = """
        Credentials: boto3's default chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
        AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws/credentials), never options.  The endpoint:
        --endpoint, else $SNAPDISK_S3_ENDPOINT, else $AWS_ENDPOINT_URL, else AWS."""


def register(sub: Any) -> None:
    p = add_command(sub, "backup", cmd_backup, "back up snapshots to S3-compatible storage", """
        backup VOL@SNAP s3://BUCKET/PREFIX: uploads the snapshot as content-addressed,
        compressed, checksummed chunks (deduplicated across the repository's snapshots and
        volumes), then its manifest: a backup is complete or invisible.  The first backup of
        a volume is full; the next ones upload only the ranges changed since the newest
        backed-up snapshot that still exists here.  An interrupted backup run again (or with
        --resume) uploads only what is missing.  Encrypted volumes are refused (see
        docs/backup.md: back up a `snapshot copy --decrypt`).


        backup list URL: the backups in the repository.
        backup verify URL VOL@SNAP: fetch every chunk of that backup and check its checksum.
        backup prune URL --keep-last N | --keep-days D: per volume, delete the other
        backups, then the chunks no kept backup names.  Prune locks the repository: it is
        refused (busy, exit 7) while a backup, restore or verify of it runs, and they are
        refused while it runs; a lock whose holder died is ignored after 10 minutes.
        """ + ENV_TEXT, """
        export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
        snapdisk backup web@monday s3://backups/site-a --endpoint http://rgw:7480
        snapdisk backup list s3://backups/site-a
        snapdisk backup verify s3://backups/site-a web@monday
        snapdisk backup prune s3://backups/site-a --keep-last 7""")
    p.add_argument("words", nargs="+", metavar="ARG",
                   help="VOL@SNAP URL | list URL | verify URL VOL@SNAP | prune URL")
    p.add_argument("--endpoint", metavar="URL", help="the S3 endpoint (http://host:port)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted backup (every run skips uploaded chunks)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-last", type=int, metavar="N", help="prune: keep the newest N")
    g.add_argument("--keep-days", type=float, metavar="D",
                   help="prune: keep backups of snapshots taken in the last D days")
    p = add_command(sub, "restore", cmd_restore, "restore a backup into a new volume", """
        Fetches the backup's chunks (each checked against its checksum before it is written;
        a missing or damaged one is an error naming it) into a hidden volume, snapshots it
        under the backed-up snapshot's name and only then names it NEWVOL: on any failure
        no volume is left.  Holes stay holes.
        """ + ENV_TEXT, """
        snapdisk --store /srv/disks restore s3://backups/site-a web@monday web""")
    p.add_argument("url", metavar="s3://BUCKET/PREFIX")
    p.add_argument("ref", metavar="VOLUME@SNAPSHOT")
    p.add_argument("new", metavar="NEWVOLUME")
    p.add_argument("--endpoint", metavar="URL", help="the S3 endpoint (http://host:port)")
