"""What the benchmarks ran on: cores, memory, kernel, disk, tool versions, load."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from typing import Any

from benchmarks import fio, peers


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _meminfo() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _disk(path: str) -> str:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or "/"
    try:
        out = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", probe], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()
        return " ".join(out[-1].split()) if len(out) > 1 else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version() -> str:
    """The code under test: the last commit that changed src/ or native/, plus a digest of their
    uncommitted changes (the servers load whatever the work tree holds when they start)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    head = git("log", "-1", "--format=%h", "--", "src", "native") or "unknown"  # last commit touching them
    diff = git("diff", "HEAD", "--", "src", "native")
    if not diff:
        return head
    files = git("diff", "HEAD", "--name-only", "--", "src", "native").split()
    digest = hashlib.sha1(diff.encode()).hexdigest()[:8]
    return f"{head} + uncommitted {digest} ({', '.join(files)})"


def machine(workdir: str) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu(),
        "mem_bytes": _meminfo(),
        "kernel": platform.release(),
        "disk": _disk(workdir),
        "python": platform.python_version(),
        "nbdkit": peers.version(["nbdkit", "--version"]),
        "qemu": peers.version(["qemu-img", "--version"]),
        "fio": fio.version(),
        "loadavg_start": loadavg(),
    }
