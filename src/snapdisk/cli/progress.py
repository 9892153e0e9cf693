"""How a job's progress shows: a tqdm bar on a terminal, JSON event lines with --json, or
nothing (output to a pipe or file without --json)."""

from __future__ import annotations

import json
import sys
from typing import Any


class ProgressView:
    """A job's events as the user sees them: mode "bar" (a tqdm bar on stderr, for a
    terminal), "json" (each event as one JSON line on stderr) or "none"."""

    def __init__(self, mode: str, desc: str, file: Any = None):
        self.mode = mode
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.bar: Any = None

    def event(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            print(json.dumps(event), file=self.file, flush=True)
        elif self.mode == "bar" and event.get("event") == "job.progress":
            total = event.get("total") or None  # 0: not known yet
            if self.bar is None:
                try:
                    from tqdm import tqdm
                except ImportError:  # a source checkout without its dependencies: no bar
                    self.mode = "none"
                    return
                self.bar = tqdm(total=total, desc=self.desc, file=self.file, leave=False,
                                dynamic_ncols=True)
            self.bar.total = total
            self.bar.n = event.get("done", 0)
            self.bar.refresh()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} ({text})")
        elif self.mode == "bar":
            print(f"snapdisk: {text}", file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_mode(json_output: bool, stream: Any = None) -> str:
    stream = stream if stream is not None else sys.stderr
    if json_output:
        return "json"
    try:
        return "bar" if stream.isatty() else "none"
    except (AttributeError, ValueError):
        return "none"
