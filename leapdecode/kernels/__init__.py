"""Compiled CPU kernels (C++ with AVX2/FMA/F16C), built once per machine on first use and cached.

`build.py` compiles `native.cpp` (with its headers) with the system compiler; `native.py` binds the
library with ctypes and, as it loads, `abi.py` checks it against the interface both sides share (`abi.h`:
version, status codes and messages, the structs passed across). The model reaches them through
`leapdecode.model.linear` (backend "native").
"""
