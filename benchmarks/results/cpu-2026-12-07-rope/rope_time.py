import sys; sys.path.insert(0, ".")
import torch, torch_vjp
from torch.utils.benchmark import Timer
from torch_vjp.rotary import reference
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    B, S, H, KH, D = 1, 512, 32, 8, 128
    q = torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, KH, D, dtype=dtype).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(B, S, D, dtype=dtype), torch.randn(B, S, D, dtype=dtype)
    dq, dk = torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, KH, S, D, dtype=dtype)
    for cos_grad in (False, True):
        c, s = cos.clone().requires_grad_(cos_grad), sin.clone().requires_grad_(cos_grad)
        row = []
        for name, f in (("torch_vjp", torch_vjp.rope), ("eager", reference)):
            fwd = Timer("f(q, k, c, s)", globals=dict(f=f, q=q, k=k, c=c, s=s)).blocked_autorange(min_run_time=1).median
            fb = Timer("torch.autograd.grad(f(q, k, c, s), ins, (dq, dk))",
                       globals=dict(f=f, q=q, k=k, c=c, s=s, torch=torch, dq=dq, dk=dk,
                                    ins=(q, k, c, s) if cos_grad else (q, k))).blocked_autorange(min_run_time=1).median
            row.append((name, fwd * 1e3, fb * 1e3))
        print(dtype, "cos/sin grad" if cos_grad else "q,k grad only", " ".join(f"{n}: fwd {a:.2f} ms, fwd+bwd {b:.2f} ms" for n, a, b in row),
              f"ratio fwd+bwd {row[0][2] / row[1][2]:.2f}")
