"""Build script: the Python packages come from pyproject.toml; this adds the optional CUDA
extension ``vinekernels._C`` (sources in csrc/).

VINEPPO_BUILD_CUDA=1 forces the extension (the build fails when it cannot be built),
VINEPPO_BUILD_CUDA=0 skips it; unset, it is built when torch is importable, torch is a CUDA
build and nvcc is found, and skipped with a message otherwise. pip's default isolated build
environment has no torch, so ``pip install -e .`` gives the pure-Python package (vinekernels
then compiles the extension on first use); ``pip install --no-build-isolation -e .`` with a
CUDA torch installed builds it ahead of time.
"""

import os
import shutil
import sys

from setuptools import setup

NVCC_FLAGS = [
    "-O3", "-std=c++17", "-lineinfo",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90a,code=sm_90a",
    "-gencode", "arch=compute_90,code=compute_90",  # PTX for GPUs newer than Hopper
]


def _say(msg: str) -> None:
    print(f"vineppo setup: {msg}", file=sys.stderr)


def _cuda_extension():
    mode = os.environ.get("VINEPPO_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"VINEPPO_BUILD_CUDA must be 0 or 1, got {mode!r}")
    if mode == "0":
        _say("VINEPPO_BUILD_CUDA=0, skipping the CUDA extension vinekernels._C")
        return [], {}
    forced = mode == "1"

    def skip(reason: str):
        if forced:
            raise SystemExit(f"VINEPPO_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension vinekernels._C ({reason})")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable in the build environment")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return skip("nvcc not found (set CUDA_HOME)")

    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        name="vinekernels._C",
        sources=["csrc/ops.cpp", "csrc/sampling.cu"],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": NVCC_FLAGS},
        optional=not forced,  # unforced builds fall back to the pure-Python package on failure
    )
    _say(f"building the CUDA extension vinekernels._C with {nvcc}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
