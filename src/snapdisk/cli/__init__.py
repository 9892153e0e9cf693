"""The `snapdisk` command line: a thin front end.

Every volume and snapshot command is one backend call (`snapdisk.control.backend`): through
the server's control socket when a server runs, on the store directly when none does.  This
module only parses arguments, renders results (human tables, or `--json`), and turns errors
into one line on stderr and the exit code their class declares (errors.py).  `init` creates a
store, `serve`/`stop`/`status` drive snapdisk.daemon, `attach`/`detach` snapdisk.attach.

Long operations (rollback, snapshot delete, volume delete, clone) run as jobs, in the server or
in this process: their progress shows as a bar on a terminal (tqdm, on stderr), as JSON event
lines on stderr with --json (stdout keeps the one result document), and Ctrl-C cancels the job
and waits for it to end (exit 130).

The package: `context` (the backend a command uses, its jobs), `progress` (how a job's progress
shows), `render` (sizes, tables, the printed result), `parsing` (the global options, the
command helper, the exit-code table), and one module per noun with its commands, their help
and how their results show: `store_cmds` (init, usage, check, serve, stop, status),
`volume_cmds`, `snapshot_cmds` (snapshot, rollback, clone), `policy_cmds` (policy, config),
`device_cmds` (attach, detach).
This module assembles the parser and runs a command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import errors
from . import (
    backup_cmds,
    device_cmds,
    diff_cmds,
    image_cmds,
    key_cmds,
    policy_cmds,
    snapshot_cmds,
    store_cmds,
    stream_cmds,
    volume_cmds,
)
from .context import Context, Result
from .parsing import DEFAULT_STORE, EXIT_INTERRUPTED, Formatter, add_globals, exit_codes_text, split_ref
from .progress import ProgressView, progress_mode
from .render import emit, format_size, format_time, parse_size
from .store_cmds import CheckFailed, show_check

__all__ = ["DEFAULT_STORE", "EXIT_INTERRUPTED", "CheckFailed", "Context", "ProgressView",
           "Result", "build_parser", "exit_codes_text", "format_size", "format_time", "main",
           "parse_size", "progress_mode", "resolve_store", "split_ref"]

MAIN_DESCRIPTION = """\
snapdisk: a userspace block device with instant snapshots, rollback and clones.

A store (one directory) holds volumes (virtual disks).  `snapdisk serve` serves each volume
as an NBD export named after it, and each snapshot read-only as VOLUME@SNAPSHOT:
  nbd+unix:///VOLUME?socket=STORE/nbd.sock
  nbd+unix:///VOLUME@SNAPSHOT?socket=STORE/nbd.sock
`snapdisk attach VOLUME` turns an export into a block device to put a filesystem on.

Commands work through the running server's control socket, or on the store directly when no
server runs (one writer at a time: a second gets exit code 7).  Long operations (rollback,
delete, clone) show their progress on a terminal (JSON lines on stderr with --json); Ctrl-C
cancels them (exit code 130).  Sizes take binary units: 4096, 512M, 10G, 1.5T (1K = 1024).
`snapdisk COMMAND --help` describes each command."""

MAIN_EXAMPLES = """\
examples:
  snapdisk --store /srv/disks init --pool-size 100G
  export SNAPDISK_STORE=/srv/disks
  snapdisk volume create web 10G
  snapdisk serve
  snapdisk attach web                    # prints /dev/nbd0, or /dev/loop0 over nbdfuse
  snapdisk snapshot create web --name before-upgrade
  snapdisk rollback web@before-upgrade --force
  snapdisk clone web@before-upgrade web-test
  snapdisk usage web
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapdisk", formatter_class=Formatter, description=MAIN_DESCRIPTION,
        epilog=MAIN_EXAMPLES + "\n" + exit_codes_text())
    add_globals(parser, suppress=False)
    from importlib.metadata import PackageNotFoundError, version
    try:
        ver = version("snapdisk")
    except PackageNotFoundError:
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"snapdisk {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The order of `snapdisk --help`'s command list.
    store_cmds.register_init(sub)
    volume_cmds.register(sub)
    snapshot_cmds.register(sub)
    policy_cmds.register(sub)
    store_cmds.register(sub)
    device_cmds.register(sub)
    key_cmds.register(sub)
    # Disaster recovery: changed blocks, images, send/receive, backups to object storage.
    diff_cmds.register(sub)
    image_cmds.register(sub)
    stream_cmds.register(sub)
    backup_cmds.register(sub)
    return parser


# ---- main -------------------------------------------------------------------------------------

def resolve_store(given: str | None) -> str:
    """--store, else $SNAPDISK_STORE, else the default.  An empty one is refused, never read
    as "unset": `--store "$DIR" volume delete x` with DIR unset must not reach the default."""
    env = os.environ.get("SNAPDISK_STORE")
    if given == "" or (given is None and env == ""):
        raise errors.InvalidArgument("the store path is empty (--store or SNAPDISK_STORE): "
                                     "name a store directory")
    return os.path.abspath(given or env or DEFAULT_STORE)


def _fail(message: str, code: int) -> NoReturn:
    print(f"snapdisk: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        ctx = Context(resolve_store(a.store), progress_mode(a.json))
    except errors.SnapdiskError as e:
        _fail(e.message, e.exit_code)
    try:
        result, text = a.func(a, ctx)
        emit(a, result, text)
        return 0
    except CheckFailed as e:
        emit(a, e.report, show_check(e.report))
        _fail(f"the store has {len(e.report.get('problems') or [])} problem(s)",
              errors.Corrupt.exit_code)
    except errors.SnapdiskError as e:
        _fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `snapdisk ... | head`
        return 0
    except OSError as e:
        if os.environ.get("SNAPDISK_DEBUG"):
            raise
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1)
    finally:
        with contextlib.suppress(errors.SnapdiskError):
            ctx.close()
