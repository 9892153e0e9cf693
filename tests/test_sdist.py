"""The sdist builds and installs on its own: `python -m build --sdist`, then `pip install` of that
tarball into a fresh venv, far from the source tree, must give a working C core and CLI.

This is what catches a file the build needs but MANIFEST.in forgets (native/xm.h and
native/build_ffi.py were once missing).  pip builds the wheel with build isolation, as a user's
pip would: setuptools, wheel and cffi come from the configured package index.  20 to 45 s on a
2-core machine (more the busier it is), most of it compiling the C core; and it needs the index:
marked slow, so the default selection stays quick and offline.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _env() -> dict[str, str]:
    """The caller's environment without what would point the child at this tree's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO)))
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    p = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (f"{' '.join(argv)} exited {p.returncode}:\n"
                               f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a clean copy, as from a fresh clone: setuptools lists an sdist's files from
    # src/*.egg-info/SOURCES.txt when it exists, so a developer's tree that once held a file
    # keeps shipping it whatever MANIFEST.in says, and the test would pass where a clone fails.
    src = tmp_path_factory.mktemp("src") / "snapdisk"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", ".hypothesis",
        ".benchmarks", "*.so", "*.o", "_xm.c"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(src)], cwd=out)
    (tarball,) = out.glob("snapdisk-*.tar.gz")
    return tarball


def test_sdist_carries_every_native_source(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = {os.path.relpath(p, REPO) for pattern in ("native/*.c", "native/*.h", "native/*.py")
              for p in glob.glob(str(REPO / pattern))}
    assert "native/xm.h" in wanted and "native/build_ffi.py" in wanted
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}: add them to MANIFEST.in"


def test_sdist_installs_into_a_fresh_venv(sdist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # --system-site-packages as scripts/setup does, so it is the same interpreter nbdkit embeds;
    # the system site holds no snapdisk (checked below by where it is imported from).
    _run([PYTHON, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "snapdisk")
    _run([py, "-m", "pip", "install", "-q", "--no-cache-dir", "--disable-pip-version-check",
          str(sdist)], cwd=tmp_path)
    where = _run([py, "-c", "import snapdisk.native as n, snapdisk._xm as x; "
                  "assert n.BLOCK_SIZE == 4096 and n.FORMAT_VERSION >= 1; "
                  "print(x.__file__)"], cwd=tmp_path).strip()
    assert where.startswith(str(venv)), f"the C core came from {where}, not the fresh venv"
    assert _run([cli, "--version"], cwd=tmp_path).startswith("snapdisk ")
    # The C core at work: a store made, a volume created and the store checked by that install.
    store = str(tmp_path / "store")
    _run([cli, "--store", store, "init", "--pool-size", "64M"], cwd=tmp_path)
    _run([cli, "--store", store, "volume", "create", "v", "1M"], cwd=tmp_path)
    assert "consistent" in _run([cli, "--store", store, "check"], cwd=tmp_path)
