"""Backups to S3 (issue 13): incremental cost, and full backup / restore throughput against a
plain boto3 multi-threaded upload / download of the same bytes to the same radosgw.

    python -m benchmarks.backup_bench --quick     # a 64 MiB volume
    python -m benchmarks.backup_bench --full      # 1 GiB (the issue's size)

One run: a one-node memstore radosgw on loopback (tests/radosgw.py), a store with a volume of
random (incompressible) data and a snapshot; `backup` full; the same bytes put by boto3 with
the same number of threads as 1 MiB objects (the baseline); 10 % of the volume's 4 KiB blocks
rewritten at random places, snapshot, `backup` incremental; `restore` into a second store;
the baseline's objects fetched back.  Targets (issue 13): incremental uploads <= 1.2x the
changed bytes (before compression) in <= 0.2x the full backup's time; full backup and restore
>= 0.8x the baseline's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MiB = 1 << 20
BS = 4096


def _cpu() -> float:
    """This process's CPU seconds (all threads): what each transfer costs besides the server,
    which shares the machine's cores (radosgw runs in its own processes)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _baseline(gw: Any, data: list[bytes], threads: int, cpu_s: dict[str, float]
              ) -> tuple[float, float]:
    """(upload seconds, download seconds) of data as 1 MiB objects with plain boto3."""
    c = gw.client()
    bucket = "base-" + uuid.uuid4().hex[:8]
    c.create_bucket(Bucket=bucket)
    t, cpu = time.perf_counter(), _cpu()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: c.put_object(Bucket=bucket, Key=f"o/{i:06d}", Body=data[i]),
                      range(len(data))))
    up = time.perf_counter() - t
    cpu_s["baseline_upload"] = _cpu() - cpu
    t, cpu = time.perf_counter(), _cpu()
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda i: c.get_object(Bucket=bucket, Key=f"o/{i:06d}")["Body"]
                            .read(), range(len(data))))
    down = time.perf_counter() - t
    cpu_s["baseline_download"] = _cpu() - cpu
    assert sum(map(len, got)) == sum(map(len, data))
    for i in range(0, len(data), 1000):
        c.delete_objects(Bucket=bucket, Delete={"Objects": [
            {"Key": f"o/{j:06d}"} for j in range(i, min(i + 1000, len(data)))]})
    return up, down


def run(quick: bool, size: int | None = None) -> dict[str, Any]:
    sys.path.insert(0, TESTS)
    import radosgw  # tests/radosgw.py: the project's own start/stop helper

    from snapdisk import backup
    from snapdisk.engine import Engine
    from snapdisk.store import StoreConfig

    size = size or (64 * MiB if quick else 1024 * MiB)
    why = radosgw.installed()
    if why:
        return {"skipped": why}
    work = tempfile.mkdtemp(prefix="backup-bench-", dir="/var/tmp")
    gw = radosgw.start(os.path.join(work, "rgw"), radosgw.free_port_pair(),
                       mem_bytes=max(4 << 30, 5 * size))
    os.environ.update(gw.env())
    out: dict[str, Any] = {"size_bytes": size, "threads": backup.THREADS}
    cpu_s: dict[str, float] = {}
    out["cpu_s"] = cpu_s
    try:
        gw.client().list_buckets()  # botocore loads its models once per process: not timed
        url = f"s3://bench-{uuid.uuid4().hex[:8]}/repo"
        rng = random.Random(13)
        with Engine.create(os.path.join(work, "a"), StoreConfig(pool_bytes=3 * size)) as a:
            a.create_volume("v", size)
            vol = a.volume_id("v")
            data = [rng.randbytes(MiB) for _ in range(size // MiB)]
            for i, d in enumerate(data):
                a.write(vol, i * MiB, d)
            a.create_snapshot("v", "s1")
            t, cpu = time.perf_counter(), _cpu()
            full = a.backup("v", "s1", url)
            out["full_s"] = time.perf_counter() - t
            cpu_s["full"] = _cpu() - cpu
            out["full_uploaded_bytes"] = full["uploaded_bytes"]
            base_up, base_down = _baseline(gw, data, backup.THREADS, cpu_s)
            del data
            out["baseline_upload_s"], out["baseline_download_s"] = base_up, base_down
            blocks = rng.sample(range(size // BS), size // BS // 10)
            for b in blocks:
                a.write(vol, b * BS, rng.randbytes(BS))
            a.create_snapshot("v", "s2")
            changed = len(blocks) * BS
            t, cpu = time.perf_counter(), _cpu()
            inc = a.backup("v", "s2", url)
            out["incremental_s"] = time.perf_counter() - t
            cpu_s["incremental"] = _cpu() - cpu
            out.update(changed_bytes=changed, incremental_uploaded_bytes=inc["uploaded_bytes"],
                       incremental_stored_bytes=inc["stored_bytes"],
                       incremental_chunks=inc["uploaded_chunks"])
        with Engine.create(os.path.join(work, "b"), StoreConfig(pool_bytes=2 * size)) as b:
            t, cpu = time.perf_counter(), _cpu()
            b.restore_backup(url, "v", "s1", "r1")
            out["restore_s"] = time.perf_counter() - t
            cpu_s["restore"] = _cpu() - cpu
    finally:
        gw.stop()
        shutil.rmtree(work, ignore_errors=True)
    mib = size / MiB
    out.update(
        full_MiB_s=mib / out["full_s"], baseline_upload_MiB_s=mib / out["baseline_upload_s"],
        restore_MiB_s=mib / out["restore_s"],
        baseline_download_MiB_s=mib / out["baseline_download_s"],
        incremental_upload_ratio=out["incremental_uploaded_bytes"] / out["changed_bytes"],
        incremental_time_ratio=out["incremental_s"] / out["full_s"],
        full_vs_boto3=out["baseline_upload_s"] / out["full_s"],
        restore_vs_boto3=out["baseline_download_s"] / out["restore_s"])
    out["targets"] = {
        "incremental uploads <= 1.2x changed": out["incremental_upload_ratio"] <= 1.2,
        "incremental time <= 0.2x full": out["incremental_time_ratio"] <= 0.2,
        "full backup >= 0.8x boto3 upload": out["full_vs_boto3"] >= 0.8,
        "restore >= 0.8x boto3 download": out["restore_vs_boto3"] >= 0.8}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a 64 MiB volume")
    g.add_argument("--full", action="store_true", help="a 1 GiB volume (default)")
    p.add_argument("--size-mib", type=int, help="another volume size")
    a = p.parse_args()
    print(json.dumps(run(a.quick, a.size_mib * MiB if a.size_mib else None), indent=2))


if __name__ == "__main__":
    main()
