"""What torch.compile gets for each op: torch_vjp's kernel as one opaque node, or the op's torch-ops form
(`VJPOp.decomposition`), which inductor fuses with the op's neighbours (the residual add before a norm, the
casts and products around an activation) into the loops it generates.

An opaque op is a fusion barrier: its input and output go through memory, where inductor would have kept
them in registers. A kernel pays for that only where it beats inductor's own code for the op by more than
the round trip costs. That is measured per op and per backend (`python -m benchmarks.compile_policy`;
results in benchmarks/results/), not assumed, and recorded here, the one place the choice is made.
Eager, torch.func, torch.export, torch.jit.trace and calls below autograd always run the kernels.

`DECOMPOSE` maps an op to the device types whose compiled graphs get its torch-ops form. It may be edited
before compiling (then call `torch._dynamo.reset()` so that compiled graphs are traced again).
"""
from __future__ import annotations

# op -> device types where the torch-ops form is compiled instead of the kernel. The rule: decompose where the
# kernel is slower than inductor's fusion by more than 5% in the geometric mean of the measured cells (float32
# and bfloat16 at 1024x256 and 4096x1024, one thread); the figures are kernel ÷ decomposition, from
# benchmarks/results/cpu-2026-12-07-compile-policy. Kept as kernels on the CPU: gelu (0.45) and mish (0.40),
# whose kernels beat inductor's code for their backward; tanh (0.99) and geglu (1.03), within the margin; the
# fused loss (0.94 against torch's compiled linear + cross_entropy, and its point is memory: no (N, V)
# logits); normalize (its precision rules have no torch-ops form as cheap). CUDA: every op keeps its kernel
# until a GPU measurement exists.
_CPU = frozenset({"cpu"})
DECOMPOSE: dict[str, frozenset[str]] = {
    "exp": _CPU,  # 1.60
    "sigmoid": _CPU,  # 1.30
    "softplus": _CPU,  # 1.15
    "silu": _CPU,  # 1.24
    "swiglu": _CPU,  # 1.31
    "softmax": _CPU,  # 1.47
    "log_softmax": _CPU,  # 1.19
    "logsumexp": _CPU,  # 1.11
    "layer_norm": _CPU,  # 1.11 (the kernel wins at 4096x1024 bf16, 0.88; loses at 1024x256, 1.18-1.43)
    "rms_norm": _CPU,  # 1.13 (likewise: 0.82-0.96 at 4096x1024, 1.42-1.48 at 1024x256)
    "cross_entropy": _CPU,  # 1.18
    "rope": _CPU,  # 1.93
    "add_rms_norm": _CPU,  # 1.44
    "add_layer_norm": _CPU,  # 1.25
}


def decomposes(op: str, device_type: str) -> bool:
    """Whether torch.compile gets `op`'s torch-ops form on `device_type` (read once per traced graph)."""
    return device_type in DECOMPOSE.get(op, ())
