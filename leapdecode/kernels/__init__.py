"""Compiled CPU kernels (C++ with AVX2/FMA/F16C), built once per machine on first use and cached.

`native.py` binds them with ctypes; `build.py` compiles `native.cpp` (+ `pool.h`) with the system
compiler. The model reaches them through `leapdecode.model.linear` (backend "native").
"""
