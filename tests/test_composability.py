"""torch_vjp with what training code wraps it in: each call path, autocast, torch.export, CUDA graphs and
DistributedDataParallel. (torch.func, torch.compile and torch.jit.trace: test_autograd.py, test_library.py,
test_signatures.py.)"""
import os
import pathlib
import re
import socket
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_vjp
from torch_vjp._ops import REGISTRY
from torch_vjp.testing import OPS_BY_NAME, op_variants, sample


@pytest.mark.parametrize("info,variant", op_variants())
def test_every_call_path_computes_the_same(info, variant, device):
    """The direct call (no grad), the lean Function (grad), the torch.func Function (a forward-AD level) and
    the registered op give bitwise the same output and gradients: one kernel, whichever path."""
    c = info.call(sample(info, (4, 6), torch.float32, device), **variant)
    dy = sample(info, c.ref(*c.primals).shape, torch.float32, device, generator_seed=1)

    def forward_backward(fn):
        leaves = c.cast(requires_grad=True).primals
        y = fn(*leaves)
        return y.detach(), torch.autograd.grad(y, leaves, dy)

    direct = c.op(*c.primals)
    lean = forward_backward(c.op)
    raw = forward_backward(c.raw)
    with fwAD.dual_level():
        func = forward_backward(c.op)
    vjp_y, vjp_fn = torch.func.vjp(c.op, *c.primals)
    paths = [lean, raw, func, (vjp_y, vjp_fn(dy))]
    if info.scaled_grads and direct.dim() == 0:
        # A reduced fused loss has two VJP kernels: the eager path scales the gradients its forward computed
        # (OpInfo.scaled_grads); the other paths run the VJP op. Each is bitwise one kernel's; they agree.
        torch.testing.assert_close(lean[1], raw[1], rtol=1e-6, atol=1e-7)
        paths = paths[1:]
    for y, grads in paths:
        assert torch.equal(y, direct)
        assert all(torch.equal(g, g_first) for g, g_first in zip(grads, paths[0][1]))


@pytest.mark.parametrize("info,variant", op_variants())
def test_gradients_are_bitwise_deterministic(info, variant, device):
    """Two runs of forward and backward give the same bits, every gradient (a norm's column sums over rows
    are added in a fixed order, whatever the thread count: no atomics), at a size that spreads the rows over
    every thread and several blocks of rows."""
    shape = (2048, 48) if info.name != "fused_linear_cross_entropy" else (2048, 16)
    c = info.call(sample(info, shape, torch.float32, device), **variant)
    dy = sample(info, c.ref(*c.primals).shape, torch.float32, device, generator_seed=1)
    runs = []
    for _ in range(2):
        leaves = c.cast(requires_grad=True).primals
        y = c.op(*leaves)
        runs.append((y, *torch.autograd.grad(y, leaves, dy)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


AUTOCAST_INPUTS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("in_dtype", AUTOCAST_INPUTS, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_autocast_follows_torch(info, variant, in_dtype, device):
    """Under torch.autocast(device, bfloat16) each op's output dtype is its counterpart's (public op with
    and without grad, and the registered op), its values agree, and every gradient comes back in its
    argument's dtype, as torch's does."""
    c = info.call(sample(info, (4, 6), in_dtype, device), **variant)
    with torch.autocast(device, dtype=torch.bfloat16):
        leaves_ref, leaves = c.cast(requires_grad=True).primals, c.cast(requires_grad=True).primals
        try:
            expected = c.ref(*leaves_ref)
        except RuntimeError as error:
            # torch.cat (in rope's reference) refuses float16 under CPU bfloat16 autocast (torch 2.14: "Unexpected
            # floating ScalarType in at::autocast::prioritize"). Its ops are on none of autocast's lists: they run
            # in their input's dtype, so the reference is that, outside autocast.
            if "autocast::prioritize" not in str(error):
                raise
            with torch.autocast(device, enabled=False):
                expected = c.ref(*leaves_ref)
        outputs = [c.op(*c.primals), c.raw(*c.primals), c.op(*leaves)]
        # The dtype the op computed in: its output's, or the autocast dtype where the output is widened
        # after (the fused loss: its products run in bfloat16, its loss comes back in float32).
        computed = torch.bfloat16 if REGISTRY[info.name].autocast_output and in_dtype != torch.float64 else None
    for y in outputs:
        assert y.dtype == expected.dtype, (y.dtype, expected.dtype)
        tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(computed or y.dtype, 1e-5)
        torch.testing.assert_close(y.double(), expected.double(), rtol=tol, atol=tol)
    dy = torch.ones_like(expected)
    grads = torch.autograd.grad(outputs[2], leaves, dy)
    grads_ref = torch.autograd.grad(expected, leaves_ref, dy)
    for t, g, g_ref in zip(leaves, grads, grads_ref):
        assert g.dtype == g_ref.dtype == t.dtype


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_autocast_softmax_keeps_an_explicit_dtype(name, dtype, device):
    """torch's "fp32_set_opt_dtype" policy: a given dtype is kept (float32 only when none is given)."""
    info = OPS_BY_NAME[name]
    x = sample(info, (4, 6), torch.bfloat16, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, expected = info.op(x, dim=-1, dtype=dtype), info.ref(x, dim=-1, dtype=dtype)
        y_grad = info.op(x.clone().requires_grad_(), dim=-1, dtype=dtype)
    assert y.dtype == y_grad.dtype == expected.dtype == dtype


def header_list(text, macro):
    """The op names of one of torch's AT_FORALL_* autocast lists (ADD_NS(norm) is norm)."""
    body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, flags=re.S).group(1)
    return {m.group(1) for m in re.finditer(r"_\((?:ADD_NS\()?(\w+)", body)}


# The aten ops torch runs for each op whose name is not an aten op's: F.normalize divides by torch's norm,
# F.cross_entropy is log_softmax + nll_loss (both "fp32"), the fused loss is linear + cross_entropy.
COUNTERPARTS = {"normalize": "norm", "cross_entropy": "nll_loss", "fused_linear_cross_entropy": "linear",
                "swiglu": "silu", "geglu": "gelu"}


def test_autocast_policies_are_torchs_lists():
    """Each op's CUDA policy is the one torch's own lists (ATen/autocast_mode.h, installed with torch) give
    its counterpart, and the Autocast kernel is registered exactly there. torch's CPU lists are in its .cpp,
    not installed: the CPU behaviour is checked against torch's own by test_autocast_follows_torch."""
    header = pathlib.Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip("this torch ships no C++ headers")
    text = header.read_text()
    fp32 = (header_list(text, "AT_FORALL_FP32") | header_list(text, "AT_FORALL_FP32_SET_OPT_DTYPE")
            | header_list(text, "AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE"))
    lower = header_list(text, "AT_FORALL_LOWER_PRECISION_FP")
    assert {"exp", "softmax", "logsumexp", "layer_norm", "rms_norm", "nll_loss"} <= fp32 and "linear" in lower
    for name, spec in REGISTRY.items():
        counterpart = COUNTERPARTS.get(name, name)
        policy = "fp32" if counterpart in fp32 else "lower_precision_fp" if counterpart in lower else None
        assert spec.autocast.get("cuda") == policy, name
        has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_vjp::{name}", "AutocastCUDA")
        assert has_cuda_kernel == (policy is not None), name
        has_cpu_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_vjp::{name}", "AutocastCPU")
        assert has_cpu_kernel == ("cpu" in spec.autocast), name


# The policy mechanism on a machine without a GPU: a fresh process gives exp and softmax torch's CUDA policy
# for the CPU device, then checks each path under CPU autocast.
POLICY_PROBE = r"""
import torch, torch_vjp
from torch_vjp._ops import REGISTRY, _register_autocast
for name in ("exp", "softmax"):
    REGISTRY[name].autocast["cpu"] = "fp32"
    _register_autocast(name, "cpu", "fp32")
x = torch.randn(3, 4, dtype=torch.bfloat16)
with torch.autocast("cpu", dtype=torch.bfloat16):
    leaf = x.clone().requires_grad_()
    paths = {"direct": torch_vjp.exp(x), "raw": torch.ops.torch_vjp.exp(x), "grad": torch_vjp.exp(leaf),
             "raw grad": torch.ops.torch_vjp.exp(leaf), "f64": torch_vjp.exp(x.double()),
             "softmax": torch_vjp.softmax(x, -1), "softmax dtype": torch_vjp.softmax(x, -1, dtype=torch.bfloat16),
             "softmax dtype grad": torch_vjp.softmax(leaf, -1, dtype=torch.bfloat16)}
    (dx,) = torch.autograd.grad(paths["grad"].sum(), leaf)
print({k: str(v.dtype) for k, v in paths.items()}, str(dx.dtype))
"""


def test_autocast_policy_mechanism_on_cpu():
    """torch's "fp32" policy as registered for CUDA, exercised on the CPU: float32 on every path (direct,
    registered op, with grad), float64 left alone, an explicit softmax dtype kept, and the gradient in the
    input's dtype."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", POLICY_PROBE], capture_output=True, text=True, timeout=120,
                         cwd=pathlib.Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    dtypes, grad_dtype = run.stdout.strip().rsplit(" ", 1)
    dtypes = json.loads(dtypes.replace("'", '"'))
    assert dtypes == {"direct": "torch.float32", "raw": "torch.float32", "grad": "torch.float32",
                      "raw grad": "torch.float32", "f64": "torch.float64", "softmax": "torch.float32",
                      "softmax dtype": "torch.bfloat16", "softmax dtype grad": "torch.bfloat16"}
    assert grad_dtype == "torch.bfloat16"


def exported_model():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
            self.head = torch.nn.Parameter(torch.randn(7, 6))

        def forward(self, x, target):
            h = torch_vjp.gelu(x) + torch_vjp.softplus(x, 2.0) + torch_vjp.silu(x) + torch_vjp.mish(x)
            h = h * torch_vjp.sigmoid(x) + torch_vjp.tanh(x) + torch_vjp.exp(-x.abs())
            h = torch_vjp.log_softmax(h, -1) + torch_vjp.softmax(h, 0) + torch_vjp.logsumexp(h, (0, 1), True)
            h = torch_vjp.layer_norm(h, (6,), self.weight, self.bias) + torch_vjp.rms_norm(h, (6,), self.weight)
            y, s = torch_vjp.add_rms_norm(h, x, (6,), self.weight, offset=1.0, casting_mode="llama")
            z, s = torch_vjp.add_layer_norm(y, s, (6,), self.weight, self.bias)
            h = h + z + s
            h = torch_vjp.swiglu(h, x) + torch_vjp.geglu(x, h) + torch_vjp.normalize(h, dim=-1)
            q_embed, k_embed = torch_vjp.rope(h, x, torch.cos(self.bias), torch.sin(self.bias), 0)
            h = h + q_embed * k_embed
            loss = torch_vjp.cross_entropy(h, target, label_smoothing=0.1)
            return h, loss + torch_vjp.fused_linear_cross_entropy(h, self.head, target)

    return Model()


def test_torch_export_saves_and_loads(tmp_path):
    """torch.export traces every op as its registered op (no graph break, no Python Function), the program
    saves and loads, and gives the eager values."""
    model = exported_model()
    x, target = torch.randn(4, 6), torch.tensor([0, 3, -100, 5])
    program = torch.export.export(model, (x, target))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {f"torch_vjp.{name}.default" for name in REGISTRY} <= targets
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    x2 = torch.randn(4, 6)
    torch.testing.assert_close(loaded.module()(x2, target), model(x2, target))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("info,variant", op_variants())
def test_cuda_graph_capture_and_replay(info, variant):
    """Forward and backward capture into a CUDA graph (a host synchronisation would fail the capture) and
    replay on new arguments (every differentiable one refilled; targets kept) with the eager values; an
    eager forward + backward makes no synchronising call (torch's sync debug mode set to error)."""
    c = info.call(sample(info, (64, 96), torch.float32, "cuda"), **variant)
    static = c.cast(requires_grad=True)
    static_dy = sample(info, c.ref(*c.primals).shape, torch.float32, "cuda", generator_seed=1)

    def step():
        y = static.op(*static.primals)
        return y, torch.autograd.grad(y, static.primals, static_dy)

    torch.cuda.set_sync_debug_mode("error")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y, static_grads = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    new = info.call(sample(info, (64, 96), torch.float32, "cuda", generator_seed=5), **variant)
    with torch.no_grad():
        for t, n in zip(static.primals, new.primals):
            t.copy_(n)
    graph.replay()
    torch.cuda.synchronize()
    leaves = new.with_primals(*static.primals).cast(requires_grad=True).primals
    y = static.op(*leaves)
    torch.testing.assert_close(static_y, y)
    torch.testing.assert_close(static_grads, torch.autograd.grad(y, leaves, static_dy))


# DistributedDataParallel: 2 processes with the gloo backend on loopback, each with half the batch.

def ddp_model():
    torch.manual_seed(0)
    nn = torch_vjp.nn
    return torch.nn.Sequential(torch.nn.Linear(6, 16), nn.GELU(approximate="tanh"), torch.nn.Linear(16, 16),
                               nn.Mish(), nn.LayerNorm(16), torch.nn.Linear(16, 16), nn.SiLU(), nn.RMSNorm(16),
                               torch.nn.Linear(16, 16), nn.Softplus(), torch.nn.Linear(16, 5),
                               nn.LogSoftmax(dim=-1)).double()


def ddp_loss(model, x, target):
    log_p = model(x)
    # nll (mean over the rows) plus a term of each family, so that every family is in the graph
    extra = torch_vjp.logsumexp(log_p * 0.5, -1).mean() + (torch_vjp.softmax(log_p, -1) * torch_vjp.tanh(log_p)).mean()
    extra = extra + torch_vjp.swiglu(log_p, torch_vjp.normalize(log_p, dim=-1)).mean()
    angles = torch.linspace(0, 1, 4, dtype=log_p.dtype)  # rope over the first 4 of the 5 classes
    q_embed, k_embed = torch_vjp.rope(log_p, log_p * 0.5, angles.cos(), angles.sin(), 0)
    extra = extra + (q_embed * k_embed).mean()
    head = getattr(model, "module", model)[0].weight  # (16, 6): a head over the input, 16 classes
    fused = torch_vjp.fused_linear_cross_entropy(x, head, target, label_smoothing=0.1)
    return torch.nn.functional.nll_loss(log_p, target) + 0.1 * (extra + torch_vjp.cross_entropy(log_p, target) + fused)


def ddp_worker(rank, world_size, port, x, target, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = ddp_model()
        ddp = DistributedDataParallel(model)
        ddp_loss(ddp, x.chunk(world_size)[rank], target.chunk(world_size)[rank]).backward()
        torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_gloo_two_processes_equal_the_full_batch(tmp_path):
    """After one backward, each rank's gradients (DDP averages them) equal the gradients of one process on
    the full batch: torch_vjp's ops train under DistributedDataParallel as torch's do."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 5, (8,), generator=gen)
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), x, target, str(tmp_path)), nprocs=2, join=True)
    model = ddp_model()
    ddp_loss(model, x, target).backward()
    expected = [p.grad for p in model.parameters()]
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-14)


def test_autocast_of_another_device_leaves_the_ops_alone():
    """CUDA autocast enabled while the tensors are on the CPU: no cast, the fused loss's bfloat16 loss stays
    bfloat16 (the policy is the tensors' device's)."""
    x, w = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(7, 6, dtype=torch.bfloat16)
    target = torch.tensor([0, 3, -100, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enabling CUDA autocast without a GPU warns
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch_vjp.fused_linear_cross_entropy(x, w, target).dtype == torch.bfloat16
            assert torch_vjp.layer_norm(x, (6,)).dtype == torch.bfloat16
