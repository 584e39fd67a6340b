"""Build step for adapterhub's two optional C kernels; all other metadata is in pyproject.toml.

The kernels are plain C with no Python C API: ``adapterhub.converters.formats.native``
loads them with ctypes, which drops the GIL for each call, so threads run them
on every core. They are optional: where no C compiler is found the install goes
on without them, and the same conversions run their torch code instead (slower,
with identical bytes; tests/test_native.py compares the two).

- ``_ggml_kernels`` (converters/_c/ggml_kernels.c): GGUF tensor encoding
  (F32, F16, BF16, Q8_0) from bf16, f16 or f32 rows;
- ``_bnb_kernels`` (converters/_c/bnb_kernels*.c, bnb_kernels.h): bitsandbytes' 4-bit (NF4,
  FP4) and 8-bit quantizers on the CPU.
"""

from setuptools import Extension, setup

# -O3 vectorizes the loops; no -ffast-math: the kernels must give the
# reference's bits, so every float operation stays IEEE as written.
_CFLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension(
            "adapterhub.converters._ggml_kernels",
            ["converters/_c/ggml_kernels.c"],
            extra_compile_args=[*_CFLAGS, "-ffp-contract=off"],  # no fused multiply-adds: the reference's rounding
            optional=True,
        ),
        Extension(
            "adapterhub.converters._bnb_kernels",
            ["converters/_c/bnb_kernels.c", "converters/_c/bnb_kernels_x86.c"],
            depends=["converters/_c/bnb_kernels.h"],
            extra_compile_args=[*_CFLAGS, "-ffp-contract=off"],  # no fused multiply-adds: bitsandbytes' rounding
            optional=True,
        ),
    ],
)
