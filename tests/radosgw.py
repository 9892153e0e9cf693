"""A throwaway one-node Ceph cluster with radosgw on 127.0.0.1: the tests' real S3 server.

    gw = radosgw.start(dir, port)      # mon (port+100), one memstore OSD, radosgw on port
    gw.env()                           # AWS_* keys and SNAPDISK_S3_ENDPOINT for a client
    gw.kill_rgw(); gw.restart_rgw()    # fault injection: SIGKILL radosgw, start it again
    gw.stop()                          # SIGKILL every daemon it started (by pid), rm -rf dir

Debian 12's ceph packages (ceph-mon ceph-osd radosgw ceph-common, installed by scripts/setup).
The recipe (measured on these machines, ~2 s to start) follows ../shared/s3/ceph-s3-up.sh:
no mgr, no systemd, msgr v1 only, pool size 1, `paxos_propose_interval=0.05` (pool creation
otherwise waits on a 1 s map commit).  The daemons daemonize themselves: their pids come from
the pid files they write, remembered at once (a daemon removes its file when it exits), and
stop() kills exactly those, also when start() failed half-way.  memstore keeps the data in the
OSD's RAM: restarting radosgw alone keeps it (what the fault-injection tests do).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

ACCESS_KEY = "snapdiskaccesskey"
SECRET_KEY = "snapdisksecretkey0123456789"
DAEMONS = ("ceph-mon", "ceph-osd", "radosgw")


def installed() -> str | None:
    """None if the cluster can run here, else why not."""
    missing = [d for d in (*DAEMONS, "ceph", "ceph-authtool", "monmaptool", "radosgw-admin")
               if shutil.which(d) is None]
    return None if not missing else (f"{', '.join(missing)} not installed (scripts/setup: "
                                     "apt-get install ceph-mon ceph-osd radosgw ceph-common)")


def free_port_pair() -> int:
    """A port p with p and p + 100 (the mon) free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 100 >= 65536:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 100))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1")


CONF = """[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{mon_port}
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
mon_warn_on_insecure_global_id_reclaim_allowed = false
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
log_file = {d}/log/$name.log
mon_cluster_log_file = {d}/log/cluster.log
crash_dir = {d}/crash
keyring = {d}/admin.keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 1
mon_data_avail_crit = 0
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
[mon]
mon_data = {d}/mon/$cluster-$id
keyring = {d}/mon/$cluster-$id/keyring
[osd]
osd_data = {d}/osd/$cluster-$id
keyring = {d}/osd/$cluster-$id/keyring
osd_objectstore = memstore
memstore_device_bytes = {mem_bytes}
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
osd_max_object_size = 134217728
[client]
log_file = {d}/log/$name.log
[client.rgw.gw]
rgw_frontends = beast endpoint=127.0.0.1:{port}
rgw_data = {d}/rgw
keyring = {d}/rgw/keyring
rgw_dns_name = localhost
rgw_enable_usage_log = false
rgw_thread_pool_size = 64
"""


@dataclass
class Radosgw:
    dir: str
    port: int
    pids: dict[str, int] = field(default_factory=dict)  # daemon name -> pid

    @property
    def conf(self) -> str:
        return os.path.join(self.dir, "ceph.conf")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "SNAPDISK_S3_ENDPOINT": self.endpoint}

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"}))

    def _run(self, *cmd: str, timeout: float = 60) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "CEPH_CONF": self.conf})
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout)[-500:]}")
        return r.stdout

    def _daemon(self, name: str, *cmd: str) -> None:
        """Start a daemonizing ceph daemon and remember its pid from its pid file."""
        pidfile = os.path.join(self.dir, "run", f"{name}.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        self._run(*cmd)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                with open(pidfile) as f:
                    self.pids[name] = int(f.read().strip())
                return
            time.sleep(0.02)
        raise RuntimeError(f"{name} wrote no pid file")

    def _answering(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                return b"ListAllMyBucketsResult" in r.read()
        except Exception:
            return False

    def start_rgw(self) -> None:
        self._daemon("client.rgw.gw", "radosgw", "-c", self.conf, "-n", "client.rgw.gw")
        deadline = time.monotonic() + 60
        while not self._answering():
            if time.monotonic() > deadline or not _alive(self.pids["client.rgw.gw"]):
                raise RuntimeError(f"radosgw did not answer on {self.endpoint} "
                                   f"(log: {self.dir}/log/client.rgw.gw.log)")
            time.sleep(0.1)

    def kill_rgw(self) -> None:
        _kill(self.pids.pop("client.rgw.gw", 0))

    def restart_rgw(self) -> None:
        """radosgw again after kill_rgw (mon and OSD kept running: the data is intact)."""
        self.kill_rgw()
        self.start_rgw()

    def stop(self) -> None:
        """SIGKILL every daemon this started (radosgw, OSD, mon) and delete the directory."""
        for name in sorted(self.pids, key=lambda n: ("rgw" not in n, "osd" not in n)):
            _kill(self.pids[name])
        self.pids.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except OSError:
        return False


def _kill(pid: int) -> None:
    if pid <= 0 or not _alive(pid):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if not any(d.encode() in cmdline for d in DAEMONS):
            return  # the pid was reused: not ours any more
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        return
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def start(d: str, port: int, mem_bytes: int = 2 << 30) -> Radosgw:
    """A cluster in directory d (made here) with radosgw on 127.0.0.1:port; stopped (every
    daemon killed) if it fails to come up."""
    gw = Radosgw(d, port)
    try:
        for sub in ("mon", "osd", "run", "log", "rgw"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        with open(gw.conf, "w") as f:
            f.write(CONF.format(fsid=uuid.uuid4(), mon_port=port + 100, d=d, port=port,
                                mem_bytes=mem_bytes))
        run = gw._run
        run("monmaptool", "--create", "--fsid", _fsid(gw.conf), "--addv", "a",
            f"[v1:127.0.0.1:{port + 100}]", f"{d}/monmap")
        run("ceph-authtool", "--create-keyring", f"{d}/mon.keyring", "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *")
        run("ceph-authtool", "--create-keyring", f"{d}/admin.keyring", "--gen-key", "-n",
            "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
            "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
        run("ceph-authtool", f"{d}/mon.keyring", "--import-keyring", f"{d}/admin.keyring")
        run("ceph-mon", "--mkfs", "-i", "a", "--monmap", f"{d}/monmap", "--keyring",
            f"{d}/mon.keyring", "-c", gw.conf)
        gw._daemon("mon.a", "ceph-mon", "-i", "a", "-c", gw.conf)
        run("ceph", "-c", gw.conf, "--connect-timeout", "30", "mon", "stat")
        osd_uuid = str(uuid.uuid4())
        osd = run("ceph", "-c", gw.conf, "osd", "new", osd_uuid).strip()
        os.makedirs(f"{d}/osd/ceph-{osd}", exist_ok=True)
        run("ceph", "-c", gw.conf, "auth", "get-or-create", f"osd.{osd}", "mon",
            "allow profile osd", "osd", "allow *", "mgr", "allow profile osd", "-o",
            f"{d}/osd/ceph-{osd}/keyring")
        run("ceph-osd", "-c", gw.conf, "-i", osd, "--mkfs", "--osd-uuid", osd_uuid)
        gw._daemon(f"osd.{osd}", "ceph-osd", "-c", gw.conf, "-i", osd)
        deadline = time.monotonic() + 60
        while f"osd.{osd} up" not in run("ceph", "-c", gw.conf, "osd", "dump"):
            if time.monotonic() > deadline:
                raise RuntimeError("the OSD did not come up")
            time.sleep(0.2)
        run("ceph", "-c", gw.conf, "auth", "get-or-create", "client.rgw.gw", "mon", "allow rw",
            "osd", "allow rwx", "mgr", "allow rw", "-o", f"{d}/rgw/keyring")
        gw.start_rgw()
        run("radosgw-admin", "-c", gw.conf, "user", "create", "--uid=snapdisk",
            "--display-name=snapdisk", f"--access-key={ACCESS_KEY}",
            f"--secret-key={SECRET_KEY}")
    except BaseException:
        gw.stop()
        raise
    return gw


def _fsid(conf: str) -> str:
    with open(conf) as f:
        return next(line.split("=", 1)[1].strip() for line in f if line.startswith("fsid"))


# ---- a command line, for scripts/demo ----------------------------------------------------------
#
#   python3 tests/radosgw.py up DIR     starts a cluster in DIR (made here), prints shell
#                                       exports (AWS_* keys, SNAPDISK_S3_ENDPOINT), keeps the pids
#                                       in DIR/pids.json
#   python3 tests/radosgw.py down DIR   SIGKILLs exactly those pids (still ceph daemons), rm -rf DIR

def _main(argv: list[str]) -> int:
    import json
    import shlex
    import sys
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print("usage: radosgw.py up|down DIR", file=sys.stderr)
        return 2
    d = os.path.abspath(argv[2])
    if argv[1] == "up":
        why = installed()
        if why:
            print(f"radosgw.py: {why}", file=sys.stderr)
            return 1
        gw = start(d, free_port_pair(), mem_bytes=1 << 30)
        with open(os.path.join(d, "pids.json"), "w") as f:
            json.dump({"port": gw.port, "pids": gw.pids}, f)
        for k, v in gw.env().items():
            print(f"export {k}={shlex.quote(v)}")
        return 0
    try:
        with open(os.path.join(d, "pids.json")) as f:
            saved = json.load(f)
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
        return 0
    Radosgw(d, saved["port"], {k: int(v) for k, v in saved["pids"].items()}).stop()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(_main(sys.argv))
