"""Triton kernels, loaded on first use so that importing vinekernels never imports triton.

Triton decides at decoration time whether a kernel is compiled or interpreted. The kernels
module is therefore loaded twice on demand: once compiled (for CUDA tensors) and once under the
Triton interpreter (for CPU tensors), each as its own module object, so both can coexist in one
process whatever TRITON_INTERPRET says.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

_KERNELS_FILE = os.path.join(os.path.dirname(__file__), "kernels.py")


def kernels_for(interpret: bool) -> ModuleType:
    """The kernels module, compiled (interpret=False) or run by the Triton interpreter."""
    name = f"{__name__}.kernels_{'interpreted' if interpret else 'compiled'}"
    module = sys.modules.get(name)
    if module is None:
        import triton

        spec = importlib.util.spec_from_file_location(name, _KERNELS_FILE)
        module = importlib.util.module_from_spec(spec)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
        sys.modules[name] = module
    return module
