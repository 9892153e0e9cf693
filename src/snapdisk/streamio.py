"""The data path of send and receive (sendrecv.py): a snapshot read one window at a time
into one reused buffer, and a stream's records verified in a thread ahead of the writes.

An encrypted volume's window is read raw (native.raw_io: the blocks as stored, ciphertext, no
key needed); a plain volume's reads are the same either way.

Measured on the 2-core machine (benchmarks/sendrecv_bench.py): the receive was bound by
checksumming and writing one after the other; with the records verified a step ahead
(zlib.crc32 and the C write path both release the GIL) the two overlap.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import catalog, extmap
from .layout import BLOCK_SIZE
from .native import raw_io
from .stream import DATA, DATA_CHUNK, TRIM, Record, StreamReader

if TYPE_CHECKING:
    from .engine import Engine

AHEAD = 2  # records verified ahead of the writes (read_ahead)
ZEROS = bytes(DATA_CHUNK)


def zeros(payload: memoryview) -> bool:
    # memoryview == bytes compares item by item (~120 MiB/s measured); a copy then memcmp
    # is ~10x faster, and most data blocks differ from zeros in their first bytes anyway.
    return payload[:64] == ZEROS[:min(64, len(payload))] and \
        payload.tobytes() == ZEROS[:len(payload)]


class WindowReader:
    """One window of a snapshot's view: its holes and allocated runs, data read into one
    reused buffer (the same reads as volume.read_snapshot, without its per-call copies)."""

    def __init__(self, engine: Engine, vol: int, epoch: int, raw: bool = False):
        self.engine, self.vol, self.epoch, self.raw = engine, vol, epoch, raw
        self.buf = bytearray(DATA_CHUNK)
        self.view = memoryview(self.buf)

    def window(self, offset: int, length: int) -> Iterator[tuple[int, int, int, memoryview]]:
        """(kind DATA or TRIM, offset, length, payload) covering [offset, offset+length);
        offset block aligned, length <= DATA_CHUNK.  Payloads valid until the next call."""
        end = offset + length
        lo, hi = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        runs: list[tuple[int, int, int]] = []  # (kind, start, stop) in bytes
        ns = self.engine.native
        raw = raw_io() if self.raw else contextlib.nullcontext()
        with raw, ns.gate_shared(), ns.txn() as t:
            catalog.snap_record(t, self.vol, self.epoch)  # still there
            for r in extmap.clip(extmap.view_at(t, self.vol, self.epoch, lo, hi), lo, hi):
                s, x = r.lba * BLOCK_SIZE, min((r.lba + r.len) * BLOCK_SIZE, end)
                self.engine.pool.read_into(r.pbn, self.view[s - offset:x - offset],
                                           vol=self.vol, lba=r.lba)
                if runs and runs[-1][2] == s:
                    runs[-1] = (DATA, runs[-1][1], x)
                else:
                    runs.append((DATA, s, x))
        pos = offset
        for _, s, x in runs:
            if pos < s:
                yield TRIM, pos, s - pos, self.view[:0]
            yield DATA, s, x - s, self.view[s - offset:x - offset]
            pos = x
        if pos < end:
            yield TRIM, pos, end - pos, self.view[:0]


def read_ahead(reader: StreamReader) -> Iterator[Record]:
    """reader.records() read and verified in a thread, AHEAD records ahead of the caller, so
    hashing (hashlib releases the GIL) overlaps the writes (so does the C write path): the
    receive's own ceiling rose from ~1x to ~2x the slower of the two on 2 cores.  The reader
    rotates AHEAD + 2 payload buffers: one being filled, AHEAD queued, one being written."""
    q: queue.Queue[Any] = queue.Queue(AHEAD)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for r in reader.records():
                while not stop.is_set():
                    try:
                        q.put(r, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=produce, name="snapdisk-receive-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()  # unblock the producer's put
        thread.join(timeout=1)  # a producer blocked on a stalled pipe: left to end there
