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

# op -> device types where the torch-ops form is compiled instead of the kernel. Absent ops, and device types
# not named, keep the kernel: the fused loss (its point is memory: no (N, V) logits), normalize (its
# precision rules have no cheaper torch-ops form), and every op on CUDA, where no measurement exists yet.
DECOMPOSE: dict[str, frozenset[str]] = {}


def decomposes(op: str, device_type: str) -> bool:
    """Whether torch.compile gets `op`'s torch-ops form on `device_type` (read once per traced graph)."""
    return device_type in DECOMPOSE.get(op, ())
