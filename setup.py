"""The C extension with colearn's fused merge loops; everything else is in pyproject.toml.

optional=True: without a C compiler the install goes on and the merges take the eager PyTorch path.
"""

import sys

from setuptools import Extension, setup

# GCC/Clang: -fno-trapping-math lets masked loops vectorize; -ffp-contract=off keeps results the same on every CPU.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp-simd"]

setup(ext_modules=[Extension("colearn._kernels", ["colearn/_kernels.c"], depends=["colearn/_kernels_typed.h"],
                             extra_compile_args=FLAGS, optional=True)])
