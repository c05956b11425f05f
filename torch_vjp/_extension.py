"""Loads the compiled libraries: the op schemas (and CUDA kernels, when built) and the CPU kernels built
for the CPU capability torch itself uses.

setup.py compiles the CPU kernels once per capability (`_cpu_default`, `_cpu_avx2`, `_cpu_avx512`, as
ATen compiles its own). The one loaded is the one `torch.backends.cpu.get_cpu_capability()` names, which
honours `ATEN_CPU_CAPABILITY`, so torch_vjp runs the same instruction set as torch's own kernels.
"""
from __future__ import annotations

import importlib

import torch

try:
    from . import _C
except ImportError as error:
    raise ImportError(
        f"torch_vjp's compiled kernels could not be loaded ({error}). Build them against the torch in use, "
        f"torch {torch.__version__}: pip install --no-build-isolation -e ."
    ) from error

# torch's capability names -> ours, widest first (a build off x86-64 has only "default").
_CAPABILITIES = {"AVX512": "avx512", "AVX2": "avx2"}


def _load_cpu_kernels():
    wanted = _CAPABILITIES.get(torch.backends.cpu.get_cpu_capability(), "default")
    order = list(_CAPABILITIES.values())
    candidates = order[order.index(wanted):] + ["default"] if wanted != "default" else ["default"]
    for isa in candidates:
        try:
            return importlib.import_module(f"torch_vjp._cpu_{isa}")
        except ModuleNotFoundError:
            continue
    raise ImportError("torch_vjp's CPU kernels are missing (no torch_vjp._cpu_default); rebuild: "
                      "pip install --no-build-isolation -e .")


_CPU = _load_cpu_kernels()


def backends() -> dict:
    """What this build of torch_vjp runs on: {"cpu": the CPU capability of the loaded CPU kernels
    ("default", "avx2" or "avx512"), "cuda": the CUDA architectures compiled in ("8.0,9.0"), or None when
    the CUDA kernels were not built}."""
    return {"cpu": _CPU.capability.lower(), "cuda": _C.cuda_archs}


def cuda_missing_error(op_name: str) -> RuntimeError:
    return RuntimeError(
        f"torch_vjp.{op_name}: got a CUDA tensor, but this build of torch_vjp has no CUDA kernels (they are built "
        f"when a GPU is visible at build time). Rebuild with them: FORCE_CUDA=1 pip install --no-build-isolation -e ."
    )
