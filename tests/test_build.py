"""The build: one CPU kernel library per CPU capability, chosen as torch chooses its own; CUDA tensors on a
CPU-only build get an error that names the fix."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torch_vjp
from torch_vjp.testing import OPS, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The instruction sets each capability's library is compiled for (setup.py's CPU_CAPABILITIES), as
# /proc/cpuinfo names them. ATEN_CPU_CAPABILITY is obeyed without this check, so only ask for what runs here.
NEEDS = {"default": set(), "avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}}


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def runnable_capabilities():
    flags = cpu_flags()
    built = {name.split("_cpu_")[1].split(".")[0] for name in os.listdir(os.path.dirname(torch_vjp.__file__))
             if name.startswith("_cpu_")}
    return [isa for isa in NEEDS if isa in built and NEEDS[isa] <= flags]


# Every op forward and backward (every differentiable argument), on shapes with vector tails and a non-last
# dim, in each dtype.
PROBE = r"""
import json, sys, torch, torch_vjp
from torch_vjp.testing import OPS, sample
out = {"backends": torch_vjp.backends(), "torch": torch.backends.cpu.get_cpu_capability(), "values": {}}
for info in OPS:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for shape, dim in (((5, 37), -1), ((37, 5), 0), ((1000,), 0)):
            if (info.name == "fused_linear_cross_entropy" or info.family == "rope") and len(shape) != 2:
                continue  # hidden states (N, H); rope's queries (..., D) need a row dim for cos and sin
            kwargs = {"dim": dim} if info.has_dim else {}
            c = info.call(sample(info, shape, dtype), **kwargs, **info.variants[-1]).cast(requires_grad=True)
            y = c.op(*c.primals)
            grads = torch.autograd.grad(y, c.primals, sample(info, y.shape, dtype, generator_seed=1))
            key = f"{info.name} {dtype} {shape}"
            out["values"][key] = [y.double().flatten().tolist(), *(g.double().flatten().tolist() for g in grads)]
json.dump(out, sys.stdout)
"""


def probe(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def test_backends_reports_the_build():
    backends = torch_vjp.backends()
    assert set(backends) == {"cpu", "cuda"}
    torch_capability = torch.backends.cpu.get_cpu_capability()
    assert backends["cpu"] == {"AVX512": "avx512", "AVX2": "avx2"}.get(torch_capability, "default")
    assert backends["cuda"] is None or all(arch[0].isdigit() for arch in backends["cuda"].split(","))
    assert torch_vjp.has_kernel("softmax", "cuda") == (backends["cuda"] is not None)


def test_each_cpu_capability_is_loaded_on_request_and_agrees_with_default():
    """ATEN_CPU_CAPABILITY=default|avx2|avx512 (what this CPU can run) loads that build of the CPU kernels,
    whose values and gradients agree with the default build's to the dtype's rounding."""
    capabilities = runnable_capabilities()
    assert "default" in capabilities
    reference = probe("default")
    assert reference["backends"]["cpu"] == "default"
    tolerance = {"torch.float64": 1e-12, "torch.float32": 2e-6, "torch.bfloat16": 1.6e-2, "torch.float16": 2e-3}
    for capability in capabilities[1:]:
        result = probe(capability)
        assert result["backends"]["cpu"] == capability, (capability, result["torch"])
        assert result["values"].keys() == reference["values"].keys()
        for key, values in result["values"].items():
            rtol = tolerance[key.split()[1]]
            for k, (value, ref) in enumerate(zip(values, reference["values"][key])):
                torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                                           rtol=rtol, atol=rtol, equal_nan=True,
                                           msg=f"{capability} {key} {'output' if k == 0 else f'gradient {k}'}")


@pytest.mark.skipif(torch_vjp.backends()["cuda"] is not None, reason="this build has CUDA kernels")
@pytest.mark.parametrize("info", OPS, ids=lambda info: info.name)
def test_cpu_only_build_names_the_fix_for_cuda_tensors(info):
    """The kernel a CUDA tensor reaches in a CPU-only build (called here through the dispatcher's CUDA entry,
    as no GPU is needed for that) says to rebuild with FORCE_CUDA=1."""
    from torch_vjp._ops import REGISTRY

    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    c = info.call(sample(info, (2, 3), torch.float32))
    args = c.raw_args()
    outputs = getattr(torch.ops.torch_vjp, info.name)(*args)
    y = outputs[0] if isinstance(outputs, tuple) else outputs
    grad = tuple(torch.ones_like(o) for o in outputs[:info.outputs]) if info.outputs > 1 else torch.ones_like(y)
    calls = {info.name: args, info.name + "_backward": REGISTRY[info.name].vjp_call_args(args, outputs, grad)}
    for name, call_args in calls.items():
        with pytest.raises(RuntimeError, match="no CUDA kernels.*FORCE_CUDA=1"):
            getattr(torch.ops.torch_vjp, name).default.redispatch(cuda, *call_args)


def test_installs_the_torch_vjp_package_only():
    """pip installs torch_vjp (with its py.typed marker) and no top-level benchmarks or tests package:
    those are the repository's, run from its root (python -m benchmarks, pytest tests)."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)["tool"]["setuptools"]
    assert config["packages"] == ["torch_vjp"]
    assert "py.typed" in config["package-data"]["torch_vjp"]
    assert os.path.exists(os.path.join(ROOT, "torch_vjp", "py.typed"))
