"""cffi (API mode) build of the C core: snapdisk._xm.

The declarations are read from native/xm_layout.h (the on-disk format) and native/xm.h (the API)
between their cdef markers, so the headers stay the one place they are written; `#define NAME
value` lines become `#define NAME ...` and cffi takes the values from the compiler, never from a
copy.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


HEADERS = ["xm_layout.h", "xm.h"]  # in include order
SOURCES = ["xm_map.c", "xm_env.c", "xm_kv.c", "xm_pool.c", "xm_io.c", "xm_row.c", "xm_verify.c", "xm_space.c",
           "xm_crypt.c", "xm_bulk.c", "xm_bulk_rb.c", "xm_bulk_clone.c",
           "xm_batch.c", "xm_resv.c",  # group commit (issue 9)
           "xm_bulk_chunk.c", "xm_batch_life.c",  # perf: xm_bulk.c, xm_batch.c split
           "xm_multiread.c",  # backups: xm_snap_readv (issue 13)
           "xm_drop.c"]  # superseded blocks' cached pages dropped (issue 9)


def cdef_section(name: str) -> str:
    with open(os.path.join(HERE, name)) as f:
        text = f.read()
    body = text.split("/* cdef-begin")[1].split("/* cdef-end */")[0]
    body = body.split("*/", 1)[1]  # the rest of the marker comment
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return re.sub(r"^#define\s+(\w+)\s+.*$", r"#define \1 ...", body, flags=re.M)


def cdef_text() -> str:
    return "\n".join(cdef_section(h) for h in HEADERS)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "snapdisk._xm",
    '#include "xm.h"',
    sources=[os.path.join("native", name) for name in SOURCES],
    depends=[os.path.join("native", name) for name in [*HEADERS, "xm_internal.h", "xm_bulk.h"]],
    include_dirs=[HERE],
    libraries=["lmdb", "pthread", "crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
