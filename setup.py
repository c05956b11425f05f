"""Build torch_vjp's compiled kernels against the torch already installed.

Extensions:
  torch_vjp._C             every op schema; the CUDA kernels when CUDA is built (below)
  torch_vjp._cpu_<isa>     the CPU kernels, compiled once per CPU capability: default, avx2 and avx512 on
                           x86-64 (as ATen compiles its own), default elsewhere. torch_vjp loads the one that
                           matches torch.backends.cpu.get_cpu_capability() (which honours
                           ATEN_CPU_CAPABILITY), so one build runs on any x86-64 CPU. Each capability is its
                           own library, so no AVX-512 copy of an inline function can stand in for another's.
  torch_vjp._direct        the ops as Python callables below autograd (the Python layer's fast path)

CUDA is built when a GPU is visible or FORCE_CUDA=1 is set (torchvision's rule; a container or login node
without a GPU sets FORCE_CUDA=1), never with USE_CUDA=0. Otherwise the build is CPU-only and says so.

Environment: USE_CUDA=0, FORCE_CUDA=1, CUDA_HOME (else the toolkit of the nvcc on PATH, else
/usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX" without a visible GPU: machine code for the A100
and H100/H200, and compute_90 PTX that the driver JIT-compiles for newer cards, Blackwell's sm_100 and sm_120,
which would otherwise find no kernel image), MAX_JOBS, TORCH_VJP_CPU_CAPABILITIES (development only: build
some CPU capabilities, e.g. "avx512", not all three).
"""
import glob
import logging
import os
import platform
import shutil
import subprocess

from setuptools import setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
# Sources compiled once per CPU capability are included from stubs written here (one object path each).
ISA_STUBS = os.path.join("build", "isa_sources")

# ATen's own flags for its AVX2 / AVX-512 kernels, and the macros its at::vec headers select on.
CPU_CAPABILITIES = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def say(message):
    print(f"torch_vjp: {message}", flush=True)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_cuda():
    if os.environ.get("USE_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not (env_flag("FORCE_CUDA") or torch.cuda.is_available()):
        return False
    if torch.version.cuda is None:
        raise SystemExit(f"torch_vjp: FORCE_CUDA=1, but torch {torch.__version__} is a CPU-only build; install a "
                         "CUDA build of torch, or build without FORCE_CUDA")
    return True


def toolkit_missing(home):
    """What a CUDA toolkit at `home` lacks for this build (nvcc, the runtime library, its headers), or []."""
    needs = {
        "bin/nvcc": [os.path.join(home, "bin", "nvcc")],
        "the CUDA runtime library (libcudart.so)": [os.path.join(home, d, "libcudart.so") for d in ("lib64", "lib")],
        "the CUDA runtime headers (include/cuda_runtime.h)": [os.path.join(home, "include", "cuda_runtime.h")],
    }
    return [what for what, paths in needs.items() if not any(os.path.exists(p) for p in paths)]


def nvcc_toolkits():
    """The toolkit the nvcc on PATH belongs to: its resolved path, then (nvcc may be a wrapper script that
    execs the real one) the folder nvcc itself reports."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    found = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ _HERE_="):
                found.append(os.path.dirname(line.split("=", 1)[1].strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def find_cuda_toolkit():
    """CUDA_HOME if set (and then only it), else the toolkit of the nvcc on PATH, else /usr/local/cuda: the
    first with nvcc, the runtime library and its headers. Checked now, not minutes into the compile."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [explicit] if explicit else [*nvcc_toolkits(), "/usr/local/cuda"]
    for home in dict.fromkeys(os.path.realpath(c) for c in candidates):
        if not toolkit_missing(home):
            return home
    where = explicit or candidates[0]
    missing = toolkit_missing(os.path.realpath(where)) if os.path.exists(where) else ["the folder itself"]
    raise SystemExit(f"torch_vjp: building the CUDA kernels needs a CUDA toolkit, and {where} lacks "
                     f"{', '.join(missing)}; set CUDA_HOME=/path/to/cuda, or build the CPU kernels only with USE_CUDA=0")


def cpu_capabilities():
    """Every capability on x86-64; TORCH_VJP_CPU_CAPABILITIES="avx512" (comma-separated) builds only those, a
    developer's faster rebuild: torch_vjp then loads the widest built one the CPU supports."""
    isas = list(CPU_CAPABILITIES) if platform.machine().lower() in ("x86_64", "amd64") else ["default"]
    wanted = [w.strip() for w in os.environ.get("TORCH_VJP_CPU_CAPABILITIES", "").split(",") if w.strip()]
    unknown = [w for w in wanted if w not in isas]
    if unknown:
        raise SystemExit(f"torch_vjp: TORCH_VJP_CPU_CAPABILITIES names {unknown}; this machine builds {isas}")
    return wanted or isas


def isa_sources(isa):
    """One stub per CPU kernel source, which #includes it, so each capability compiles to its own objects."""
    folder = os.path.join(ISA_STUBS, isa)
    os.makedirs(folder, exist_ok=True)
    stubs = []
    for source in sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))):
        stub = os.path.join(folder, os.path.basename(source))
        text = f'// Generated by setup.py: {source} for CPU capability {isa}.\n#include "{os.path.relpath(source, "csrc")}"\n'
        if not os.path.exists(stub) or open(stub).read() != text:  # unchanged stubs keep ninja's timestamps
            with open(stub, "w") as f:
                f.write(text)
        stubs.append(stub)
    return stubs


def extensions(cuda_home):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, include_paths

    # torch's headers as system headers: their warnings are torch's to fix, and must not bury ours.
    torch_headers = include_paths()
    system = [flag for path in torch_headers for flag in ("-isystem", path)]
    # -Wno-(maybe-)uninitialized: GCC 12 reports its own AVX-512 intrinsics (_mm512_undefined_*, GCC bug 105593)
    # wherever at::vec inlines them; torch builds itself with -Wno-maybe-uninitialized for the same reason.
    cxx = ["-O3", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-Wno-maybe-uninitialized", "-Wno-uninitialized", *system]

    def without_torch_headers(ext):
        ext.include_dirs = [d for d in ext.include_dirs if d not in torch_headers]
        return ext

    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without it the CPU kernels use one thread.
    # -ffp-contract=off: GCC would otherwise fuse a*b + c into an FMA in some inlined copies of a formula and
    # not in others (a vector body and its row tail), and an element's result would depend on its position.
    cpu = [
        without_torch_headers(CppExtension(
            f"torch_vjp._cpu_{isa}",
            isa_sources(isa),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": [*cxx, "-fopenmp", "-ffp-contract=off", *CPU_CAPABILITIES[isa]]},
            extra_link_args=["-fopenmp"],
        ))
        for isa in cpu_capabilities()
    ]
    # The ops as direct Python callables below autograd (csrc/python/direct.cpp): host code only, either build.
    direct = without_torch_headers(CppExtension("torch_vjp._direct", [os.path.join("csrc", "python", "direct.cpp")],
                                                include_dirs=[CSRC], extra_compile_args={"cxx": cxx}))
    main_sources = [os.path.join("csrc", "registration.cpp")]
    if cuda_home is None:
        return [without_torch_headers(CppExtension("torch_vjp._C", main_sources, include_dirs=[CSRC],
                                                   extra_compile_args={"cxx": cxx})), *cpu, direct]
    # The arch list, reported by torch_vjp.backends(): "8.0,9.0" (no ';' or quotes to survive the shell).
    archs = ",".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DTORCH_VJP_WITH_CUDA", *system]
    main = CUDAExtension(
        "torch_vjp._C",
        main_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=[CSRC, *pip_cuda_include_dirs()],
        extra_compile_args={"cxx": [*cxx, "-DTORCH_VJP_WITH_CUDA", f"-DTORCH_VJP_CUDA_ARCHS={archs}"], "nvcc": nvcc},
    )
    return [without_torch_headers(main), *cpu, direct]


def pip_cuda_include_dirs():
    """CUDA library headers shipped in pip wheels beside torch (nvidia/cu13/include, ...): ATen's CUDA headers
    include cusparse.h and friends, which a bare toolkit may lack."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def configure():
    """Decides the backends, prints the one line that says so, and sets what torch's build helpers read."""
    # torch's helpers warn at import when they guess a CUDA_HOME; the line below says what is built.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    cpu = f"CPU kernels for {', '.join(cpu_capabilities())}"
    if not build_cuda():
        why = "USE_CUDA=0" if os.environ.get("USE_CUDA") else "no GPU visible; FORCE_CUDA=1 builds them without one"
        say(f"{cpu}; no CUDA kernels ({why})")
        return None
    cuda_home = find_cuda_toolkit()
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # torch's own default needs a visible GPU
        os.environ["TORCH_CUDA_ARCH_LIST"] = (
            "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else "8.0;9.0+PTX")
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # read when the module was imported; the toolkit chosen above wins
    say(f"{cpu}; CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} with the toolkit at {cuda_home}")
    return cuda_home


cuda_home = configure()
if shutil.which("ninja") is None:
    say("ninja not found; the build will be serial and slow (pip install ninja)")

from torch.utils.cpp_extension import BuildExtension  # noqa: E402  (after configure: it reads CUDA_HOME)

setup(
    ext_modules=extensions(cuda_home),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
