"""Loader for the CUDA C++ extension ``vinekernels._C`` (sources in ``csrc/``).

``load_extension()`` returns the prebuilt module when ``setup.py`` compiled it; otherwise, in a
source checkout with a CUDA build of torch and nvcc, it compiles the same sources once with
``torch.utils.cpp_extension.load`` into a cache directory; otherwise it returns None and callers
use their torch reference. It never raises: a failed build is reported with a warning.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import warnings
from pathlib import Path

import torch

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("ops.cpp", "sampling.cu")
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def _nvcc_available() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _cache_dir() -> Path:
    root = os.environ.get("VINEKERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vinekernels")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build():
    from torch.utils.cpp_extension import load

    sources = [str(CSRC_DIR / name) for name in SOURCES]
    return load(name="_vinekernels_C", sources=sources, extra_cflags=["-O3"],
                extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(CSRC_DIR)],
                build_directory=str(_cache_dir()), verbose=False)


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled extension module, or None when it is neither built nor buildable here."""
    try:
        return importlib.import_module("vinekernels._C")
    except (ImportError, OSError):  # not built, or built against another torch
        pass
    if torch.version.cuda is None or not all((CSRC_DIR / n).exists() for n in SOURCES):
        return None
    if os.environ.get("VINEPPO_BUILD_CUDA") == "0" or not _nvcc_available():
        return None
    try:
        return _jit_build()
    except Exception as exc:  # a broken toolchain must not break the torch fallback
        warnings.warn(f"vinekernels: building the CUDA extension failed ({exc}); "
                      "using the torch reference instead", RuntimeWarning, stacklevel=2)
        return None
