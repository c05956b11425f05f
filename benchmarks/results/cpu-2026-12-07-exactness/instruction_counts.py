"""Instructions retired by one forward and one backward call of each cell, counted by callgrind (valgrind), with
collection switched on around the call alone (callgrind_toggle.c, built with
`gcc -O2 -shared -fPIC -o /tmp/libcgctl.so callgrind_toggle.c`). Deterministic, unlike wall time on this machine
(README.md, "A/A"). Valgrind has no AVX-512, so torch and torch_vjp run their AVX2 kernels. Run per build:

    PYTHONPATH=<tree> valgrind --tool=callgrind --collect-atstart=no --callgrind-out-file=<dir>/cg.%p \
        python instruction_counts.py
then `python instruction_counts_table.py <before dir> <after dir>`.
Shapes are the benchmark's row lengths with fewer rows (the count per element does not depend on the rows).
"""
# Instruction counts (callgrind) of one forward and one backward call per cell, collection only around the call.
import ctypes, torch, torch_vjp as tv
cg = ctypes.CDLL("/tmp/libcgctl.so")
torch.set_num_threads(1)
torch.manual_seed(0)
shapes = [(2048, 256), (16, 32768), (256, 2048)]
ops = ["softmax", "log_softmax", "logsumexp", "layer_norm", "rms_norm", "normalize", "cross_entropy"]
def make(op, dt, shape):
    x = torch.randn(shape, dtype=dt, requires_grad=True); n = shape[-1]
    if op == "softmax": return x, lambda: tv.softmax(x, -1)
    if op == "log_softmax": return x, lambda: tv.log_softmax(x, -1)
    if op == "logsumexp": return x, lambda: tv.logsumexp(x, -1)
    if op == "layer_norm":
        w = torch.randn(n, dtype=dt, requires_grad=True); b = torch.randn(n, dtype=dt, requires_grad=True)
        return x, lambda: tv.layer_norm(x, (n,), w, b)
    if op == "rms_norm":
        w = torch.randn(n, dtype=dt, requires_grad=True); return x, lambda: tv.rms_norm(x, (n,), w)
    if op == "normalize": return x, lambda: tv.normalize(x, dim=-1)
    t = torch.randint(0, n, shape[:1]); return x, lambda: tv.cross_entropy(x, t)
for dt in (torch.float32, torch.bfloat16):
    for shape in shapes:
        for op in ops:
            x, f = make(op, dt, shape)
            y = f(); g = torch.randn_like(y); torch.autograd.backward(y, g, retain_graph=True)  # warm-up
            name = f"{op}-{str(dt)[6:]}-{shape[0]}x{shape[1]}"
            cg.cg_on(); y = f(); cg.cg_off((name + "-fwd").encode())
            cg.cg_on(); torch.autograd.backward(y, g, retain_graph=True); cg.cg_off((name + "-bwd").encode())
print("ok")
