"""A/A timing: one process times each cell (median of 41 calls, forward, then backward with retain_graph);
run alternately in two directories that import the same build (see README.md, "A/A").
It keeps freed memory in the process (glibc mallopt), as benchmarks/timing.py does."""
import ctypes; libc = ctypes.CDLL('libc.so.6'); libc.mallopt(-4, 0); libc.mallopt(-1, 2**31-1)
import sys, time, statistics, torch, torch_vjp as tv
torch.set_num_threads(2)
torch.manual_seed(0)
cells = [
 ("softmax", torch.float32, (32768, 256)), ("logsumexp", torch.float32, (32768, 256)),
 ("layer_norm", torch.float32, (32768, 256)), ("layer_norm", torch.bfloat16, (4096, 2048)),
 ("layer_norm", torch.float32, (256, 32768)),
 ("rms_norm", torch.bfloat16, (4096, 2048)), ("rms_norm", torch.float32, (256, 32768)),
 ("normalize", torch.float32, (4096, 2048)), ("cross_entropy", torch.float32, (32768, 256)),
]
def make(op, dt, shape):
    x = torch.randn(shape, dtype=dt, requires_grad=True); n = shape[-1]
    if op == "softmax": f = lambda: tv.softmax(x, -1)
    elif op == "logsumexp": f = lambda: tv.logsumexp(x, -1)
    elif op == "layer_norm":
        w = torch.randn(n, dtype=dt, requires_grad=True); b = torch.randn(n, dtype=dt, requires_grad=True)
        f = lambda: tv.layer_norm(x, (n,), w, b)
    elif op == "rms_norm":
        w = torch.randn(n, dtype=dt, requires_grad=True); f = lambda: tv.rms_norm(x, (n,), w)
    elif op == "normalize": f = lambda: tv.normalize(x, dim=-1)
    elif op == "cross_entropy":
        t = torch.randint(0, n, shape[:1]); f = lambda: tv.cross_entropy(x, t)
    return f
def med(fn, reps=41):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
for op, dt, shape in cells:
    f = make(op, dt, shape)
    fwd = med(lambda: f())
    y = f(); g = torch.randn_like(y)
    def b():
        torch.autograd.backward(y, g, retain_graph=True)
    bwd = med(b)
    print(f"{op},{str(dt)[6:]},{shape[0]}x{shape[1]},{fwd:.3f},{bwd:.3f}", flush=True)
