"""Speed of light: the fewest bytes each op must move, written beside the op.

SoL time = these bytes / the memory ceiling measured in the same run (ceiling.memory_ceiling).
A fused kernel cannot beat it: every tensor named below must cross memory at least once.

The table counts *tensor-passes*: one read or one write of a tensor the size of the input
(rows × n elements of the benchmark dtype). Row vectors (one value per row) and n-vectors (a norm's
weight and bias, their gradients) are ignored: at the benchmark sizes (rows, n ≥ 256, rows·n ≥ 2²³) they
are under 0.4% of a pass. The fused loss is matrix products, timed against the products themselves
(benchmarks/fused_loss.py), not against bytes.
"""
from __future__ import annotations

# (forward passes, backward passes), looked up by op name first, then by family.
PASSES: dict[str, tuple[int, int]] = {
    # Elementwise y = f(x): forward reads x, writes y (2). Backward reads dy and x (or y, for
    # exp/sigmoid/tanh), writes dx (3). Total 5.
    "elementwise": (2, 3),
    # softmax / log_softmax: forward reads x, writes y (2). Backward reads dy and y, writes dx (3).
    # The row reduction (max, sum) stays in registers or cache: no extra pass in a fused kernel.
    "softmax": (2, 3),
    "log_softmax": (2, 3),
    # logsumexp reduces each row to one value: forward reads x and writes one value per row (1).
    # Backward reads x (and the per-row dy and output, negligible), writes dx (2). Total 3.
    "logsumexp": (1, 2),
    # layer_norm, rms_norm: forward reads x, writes y (2); saves x and per-row statistics, never x̂. Backward
    # reads dy and x, writes dx (3); dweight and dbias are column sums accumulated in that same pass into
    # per-block partial rows (blocks × n values, negligible) and summed after. Total 5.
    # normalize: forward reads x, writes y (2). Backward reads dy and the saved y, writes dx (3). Total 5.
    "norm": (2, 3),
    # add_layer_norm, add_rms_norm (s = input + residual, then the norm of s): forward reads input and residual,
    # writes y and s (4); saves s. Backward, as the table's row times it (y alone used, no gradient reaching s
    # from elsewhere), reads dy and s, writes the one dx both inputs share (3); with that gradient ds, one more
    # read (4). Total 7.
    "add_layer_norm": (4, 3),
    "add_rms_norm": (4, 3),
    # swiglu, geglu, in passes of the gate's size: forward reads gate and up, writes y (3); saves only the
    # inputs. Backward reads dy, gate and up, writes dgate and dup (5), recomputing the activation. Total 8.
    "gated": (3, 5),
    # cross_entropy over logits (rows × n classes): forward reads them once (online max and log-sum-exp per
    # row; the loss and lse per row are negligible) (1). Backward reads the logits and writes dlogits (2):
    # grad_output is a scalar or a value per row. Total 3.
    "cross_entropy": (1, 2),
    # rope, in passes of q's size with k drawn like q (testing._draw_rope below rank 3): forward reads q and k,
    # writes q_embed and k_embed (4); backward reads dq_embed and dk_embed, writes dq and dk (4), reading nothing
    # saved but cos and sin (one row per position, shared by the heads: negligible). Total 8.
    "rope": (4, 4),
}

# fused_linear_cross_entropy is timed against its matrix products (benchmarks/fused_loss.py), but its row
# kernels' passes over each chunk of logits (rows × vocab, written by the first product) are counted here. With
# the gradient, the minimum is one read of the logits and one write of dlogits over them (2): on CUDA one
# kernel (CrossEntropyForwardGrad) does both; before, the CE forward read them and the gradient kernel read and
# wrote them (3). Without the gradient, one read (1). benchmarks/plans.py's fused_loss_passes gives the passes
# each card's plan makes (a row split across blocks reads its chunk once more).
FUSED_LOSS_ROW_PASSES = {"loss": 1, "loss+grad": 2}

PHASES = ("fwd", "bwd", "fwd+bwd")


def passes(name: str, family: str) -> tuple[int, int]:
    if name in PASSES:
        return PASSES[name]
    if family in PASSES:
        return PASSES[family]
    raise KeyError(f"benchmarks/sol.py: no byte count for op {name!r} (family {family!r}); add one to PASSES")


def sol_bytes(name: str, family: str, numel: int, itemsize: int, phase: str) -> int:
    """Fewest bytes moved by `phase` ("fwd", "bwd" or "fwd+bwd") on an input of numel elements."""
    fwd, bwd = passes(name, family)
    count = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]
    return count * numel * itemsize
