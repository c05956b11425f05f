"""Build torch_vjp._C: the C++ kernels always, the CUDA kernels when they can be compiled.

Environment:
  USE_CUDA=0           build the CPU-only extension.
  FORCE_CUDA=1         build the CUDA kernels even without a CUDA build of torch detected (needs nvcc).
  TORCH_CUDA_ARCH_LIST respected; defaults to "8.0;9.0" when no GPU is visible.
  TORCH_VJP_CPU_ISA    "avx2" or "default"; the default is "avx2" when the building CPU has AVX2 and FMA,
                       so at::vec uses 256-bit registers and SLEEF math (the built extension then needs such a CPU).
  MAX_JOBS             parallel compile jobs (ninja).
"""
import glob
import os
import platform
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_cuda():
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if env_flag("FORCE_CUDA"):
        if not nvcc_found:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a toolkit that contains bin/nvcc "
                "(for example /usr/local/cuda), or build the CPU-only extension with USE_CUDA=0."
            )
        return True
    return torch.version.cuda is not None and nvcc_found


def cpu_isa_flags():
    isa = os.environ.get("TORCH_VJP_CPU_ISA", "auto").strip().lower()
    if isa == "auto":
        isa = "default"
        if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
            flags = open("/proc/cpuinfo").read().split()
            if "avx2" in flags and "fma" in flags:
                isa = "avx2"
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if isa != "default":
        raise RuntimeError(f"TORCH_VJP_CPU_ISA must be 'avx2', 'default' or 'auto', got {isa!r}")
    return []


def pip_cuda_include_dirs():
    """CUDA library headers shipped in pip wheels beside torch (nvidia/cu13/include, ...).

    ATen's CUDA headers include cusparse.h and friends, which a bare nvcc install may lack."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cxx = ["-O3", "-fvisibility=hidden"] + cpu_isa_flags()
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("torch_vjp._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DTORCH_VJP_WITH_CUDA"]
    return CUDAExtension(
        "torch_vjp._C",
        sources,
        include_dirs=include_dirs + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx + ["-DTORCH_VJP_WITH_CUDA"], "nvcc": nvcc},
    )


if shutil.which("ninja") is None and not env_flag("TORCH_VJP_NO_NINJA"):
    print("torch_vjp: ninja not found; the build will be serial and slow (pip install ninja)")

setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
