"""Build torch_vjp._C: the C++ kernels always, the CUDA kernels when they can be compiled.

Environment:
  USE_CUDA=0           build the CPU-only extension.
  FORCE_CUDA=1         build the CUDA kernels even without a CUDA build of torch detected (needs nvcc).
  TORCH_CUDA_ARCH_LIST respected; defaults to "8.0;9.0" when no GPU is visible.
  TORCH_VJP_CPU_ISA    "avx512", "avx2" or "default"; the default is the widest the building CPU has, so
                       at::vec uses its registers and SLEEF math, as torch's own CPU kernels do (the built
                       extension then needs such a CPU).
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


CPU_ISA_FLAGS = {
    # The instruction sets torch itself requires for its AVX512 / AVX2 kernels.
    "avx512": (["avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"],
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]),
    "avx2": (["avx2", "fma", "f16c"], ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]),
    "default": ([], []),
}


def cpu_isa_flags():
    isa = os.environ.get("TORCH_VJP_CPU_ISA", "auto").strip().lower()
    if isa == "auto":
        isa = "default"
        if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
            have = set(open("/proc/cpuinfo").read().split())
            isa = next(name for name, (needs, _) in CPU_ISA_FLAGS.items() if set(needs) <= have)
    if isa not in CPU_ISA_FLAGS:
        raise RuntimeError(f"TORCH_VJP_CPU_ISA must be one of {sorted(CPU_ISA_FLAGS)} or 'auto', got {isa!r}")
    print(f"torch_vjp: CPU kernels for {isa}")
    return CPU_ISA_FLAGS[isa][1]


def pip_cuda_include_dirs():
    """CUDA library headers shipped in pip wheels beside torch (nvidia/cu13/include, ...).

    ATen's CUDA headers include cusparse.h and friends, which a bare nvcc install may lack."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without it the CPU kernels run on one thread.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"] + cpu_isa_flags()
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("torch_vjp._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DTORCH_VJP_WITH_CUDA"]
    return CUDAExtension(
        "torch_vjp._C",
        sources,
        include_dirs=include_dirs + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx + ["-DTORCH_VJP_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


if shutil.which("ninja") is None and not env_flag("TORCH_VJP_NO_NINJA"):
    print("torch_vjp: ninja not found; the build will be serial and slow (pip install ninja)")

setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
