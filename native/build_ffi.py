"""cffi (API mode) build of the C core: snapdisk._xm.

The declarations are read from native/xm.h between its cdef markers, so the header stays the one
place they are written; `#define NAME value` lines become `#define NAME ...` and cffi takes the
values from the compiler, never from a copy.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def cdef_text() -> str:
    with open(os.path.join(HERE, "xm.h")) as f:
        text = f.read()
    body = text.split("/* cdef-begin")[1].split("/* cdef-end */")[0]
    body = body.split("*/", 1)[1]  # the rest of the marker comment
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return re.sub(r"^#define\s+(\w+)\s+.*$", r"#define \1 ...", body, flags=re.M)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "snapdisk._xm",
    '#include "xm.h"',
    sources=[os.path.join("native", "xm_map.c"), os.path.join("native", "xm_store.c")],
    include_dirs=[HERE],
    libraries=["lmdb", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
