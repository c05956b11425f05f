"""Accuracy of exact GELU's half-type CUDA formula against float64, on the host, for every bf16 and fp16 input.

The CUDA kernels of bf16 and fp16 compute Φ and φ with one ex2.approx and one rcp.approx
(csrc/math/gelu_fast.h) instead of erfcf, expf and an IEEE division. benchmarks/gelu_host.cpp compiles
that header for the host, with the two approximate functions replaced by exact ones pushed to the edge of the
hardware's error bound (ex2.approx 2^-22 relative, results below 2^-126 flushed to 0; rcp.approx 2^-23), in
each direction, and evaluates f = x Φ(x) and f' = Φ(x) + x φ(x) in float for every finite bf16 and fp16 x. This
compares them with float64 (erfc-based, accurate in the lower tail), and with what torch's own float formula
for the half types (x/2 · (1 + erf(x/√2)) in float, rounded to the dtype) gives.

    python -m benchmarks.gelu_accuracy      # the figures quoted in csrc/math/gelu_fast.h
"""
from __future__ import annotations

import functools
import math
import subprocess
import sys

import numpy as np
import torch

from .plans import host_program

DTYPES = (torch.bfloat16, torch.float16)
VARIANTS = ("exact", "ex2+ rcp+", "ex2+ rcp-", "ex2- rcp+", "ex2- rcp-")


@functools.lru_cache(maxsize=1)
def gelu_host() -> str:
    return host_program("gelu_host", "-O2", "-ffp-contract=off")


def records() -> np.ndarray:
    raw = subprocess.run([gelu_host()], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.float32).reshape(-1, 5)


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f and f' in float64: Φ = erfc(-x/√2)/2 (no cancellation in the lower tail), φ = e^{-x²/2}/√(2π)."""
    x = x.double()
    cdf = 0.5 * torch.special.erfc(-x / math.sqrt(2))
    density = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return x * cdf, cdf + x * density


def torch_formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's exact GELU for the half types, in their float opmath: f = x/2 (1 + erf(x/√2)),
    f' = (1 + erf(x/√2))/2 + x e^{-x²/2}/√(2π)."""
    x = x.float()
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))


def ulp_errors(value: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|value rounded to dtype - ref| in ulps of dtype at ref (denormal-aware), where ref is finite."""
    rounded_ref = ref.to(dtype)
    ulp = (torch.nextafter(rounded_ref.abs(), torch.tensor(math.inf, dtype=dtype)) - rounded_ref.abs()).double()
    return ((value.to(dtype).double() - ref).abs() / ulp).nan_to_num(0.0)


def summary() -> list[dict]:
    rec = torch.from_numpy(records().copy())
    rows = []
    for d, dtype in enumerate(DTYPES):
        mine = rec[rec[:, 0] == d]
        tiny = torch.finfo(dtype).tiny  # the dtype's smallest normal
        for v, name in enumerate(VARIANTS):
            r = mine[mine[:, 1] == v]
            x, f, df = r[:, 2], r[:, 3], r[:, 4]
            ref_f, ref_df = reference(x)
            row = dict(dtype=str(dtype).replace("torch.", ""), variant=name, inputs=len(x))
            for key, got, ref in (("f", f, ref_f), ("df", df, ref_df)):
                normal = ref.abs() >= tiny
                rel = ((got.double() - ref).abs() / ref.abs())[normal]
                row[f"{key}_rel"] = rel.max().item()
                row[f"{key}_abs_below_normal"] = (got.double() - ref).abs()[~normal].max().item()
                row[f"{key}_ulps"] = ulp_errors(got, ref, dtype).max().item()
                row[f"{key}_off"] = int((got.to(dtype) != ref.to(dtype)).sum())  # differs from correct rounding
            if v == 0:
                tf, tdf = torch_formula(x)
                row["torch_f_ulps"] = ulp_errors(tf, ref_f, dtype).max().item()
                row["torch_df_ulps"] = ulp_errors(tdf, ref_df, dtype).max().item()
                row["torch_f_off"] = int((tf.to(dtype) != ref_f.to(dtype)).sum())
                row["torch_df_off"] = int((tdf.to(dtype) != ref_df.to(dtype)).sum())
            rows.append(row)
    return rows


if __name__ == "__main__":
    for row in summary():
        print(row)
    sys.exit(0)
