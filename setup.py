# Only here because cffi's build hook needs setuptools' setup(); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
