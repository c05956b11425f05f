"""torch_vjp: fused forward and vector-Jacobian-product kernels for PyTorch (C++ and CUDA).

Every op is a forward kernel plus a backward kernel that contracts grad_output with the local
derivatives inline (dx = dyᵀJ), so no Jacobian is ever built. See docs/vjp.md.
"""
import re

import torch

__version__ = "0.1.0"
MIN_TORCH = (2, 6)


def _torch_version(version: str) -> tuple:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


if _torch_version(torch.__version__) < MIN_TORCH:
    raise ImportError(
        f"torch_vjp needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (torch.library.register_fake, register_vmap, "
        f"opcheck); found torch {torch.__version__}"
    )

from . import functional, nn  # noqa: E402
from ._extension import backends  # noqa: E402
from ._ops import has_kernel  # noqa: E402
from ._distributed_hook import install as _install_distributed  # noqa: E402

_install_distributed()  # DTensor sharding rules, once torch.distributed.tensor is imported
from .functional import (  # noqa: E402
    add_layer_norm,
    add_rms_norm,
    cross_entropy,
    exp,
    fused_linear_cross_entropy,
    geglu,
    gelu,
    layer_norm,
    log_softmax,
    logsumexp,
    mish,
    normalize,
    rms_norm,
    rope,
    rope_cos_sin,
    rope_positions,
    sigmoid,
    silu,
    softmax,
    softplus,
    swiglu,
    tanh,
)

__all__ = ["backends", "functional", "has_kernel", "nn", *functional.__all__]
