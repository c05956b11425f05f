"""torch_vjp on torch.distributed (CPU, gloo, loopback): DTensor sharding rules for every op family and its VJP
op, vocabulary-parallel cross_entropy, FSDP2 training, bad layouts.

Each suite is one spawn of 2 (or 4) processes that runs every case and reports per family (a spawn costs
seconds of imports on a 2-core machine): a test per family then asserts its entry. Every case compares the
DTensor result (output and every gradient, gathered) with the single-process result on the full tensor, to
float32 round-off (torch.testing's default tolerances).
"""
import os
import pickle
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 150  # per suite (2 or 4 processes, every case)
COMPILED_TIMEOUT_S = 300  # the torch.compile suite: inductor compiles C++ for each rank, from a cold cache in CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, suite, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for name, case in SUITES[suite]:
            try:
                case(rank, world)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.destroy_process_group()


def _run(suite: str, world: int, timeout_s: float = TIMEOUT_S) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(_entry, args=(world, _free_port(), suite, out_dir), nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"the {world}-process suite {suite!r} ran past {timeout_s} s")
        results = {}
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                for name, outcome in pickle.load(f).items():
                    if outcome != "ok" or name not in results:
                        results[name] = outcome if outcome == "ok" else f"rank {rank}:\n{outcome}"
        return results


@pytest.fixture(scope="module")
def two():
    return _run("two", 2)


@pytest.fixture(scope="module")
def four():
    return _run("four", 4)


@pytest.fixture(scope="module")
def two_compiled():
    return _run("two_compiled", 2, COMPILED_TIMEOUT_S)


@pytest.fixture(scope="module")
def four_compiled():
    return _run("four_compiled", 4, COMPILED_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------
# The cases (run in the spawned processes).

def _mesh(shape, names=None):
    from torch.distributed.tensor import init_device_mesh
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _check(fn, tensors, placements, mesh, expect=None, grad_placements=None):
    """fn on DTensors (tensors distributed with placements; a None placement: a plain tensor, not differentiated)
    against fn on the full tensors: the output and every floating input's gradient."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    ref_in = [t.clone().requires_grad_(t.is_floating_point()) for t in tensors]
    ref = fn(*ref_in)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    d_in = [t if p is None else distribute_tensor(t, mesh, p) for t, p in zip(tensors, placements)]
    d_in = [t.requires_grad_() if t.is_floating_point() else t for t in d_in]
    out = fn(*d_in)
    assert isinstance(out, DTensor), type(out)
    if expect is not None:
        assert tuple(out.placements) == tuple(expect), (out.placements, expect)
    out.backward(distribute_tensor(gy, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, out.placements)
                 if not any(p.is_partial() for p in out.placements) else
                 distribute_tensor(gy, mesh, [Replicate()] * mesh.ndim))
    torch.testing.assert_close(out.full_tensor(), ref)
    for k, (r, d) in enumerate(zip(ref_in, d_in)):
        if r.is_floating_point():
            assert d.grad is not None, f"no gradient for input {k}"
            if grad_placements is not None and grad_placements[k] is not None:
                assert tuple(d.grad.placements) == tuple(grad_placements[k]), (k, d.grad.placements)
            torch.testing.assert_close(d.grad.full_tensor(), r.grad)
    return out


def case_elementwise(rank, world):
    import torch_vjp
    from torch.distributed.tensor import Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    fns = [torch_vjp.exp, torch_vjp.sigmoid, torch_vjp.tanh, lambda t: torch_vjp.softplus(t, 2.0, 3.0),
           torch_vjp.gelu, lambda t: torch_vjp.gelu(t, approximate="tanh"), torch_vjp.silu, torch_vjp.mish]
    for fn in fns:
        for p in (Shard(0), Shard(1), Replicate()):
            _check(fn, [x], [[p]], mesh, expect=[p], grad_placements=[[p]])


def case_gated(rank, world):
    import torch_vjp
    from torch.distributed.tensor import Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(1)
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    for fn in (torch_vjp.swiglu, torch_vjp.geglu, lambda a, b: torch_vjp.geglu(a, b, approximate="none")):
        for p in (Shard(0), Shard(1), Replicate()):
            _check(fn, [gate, up], [[p], [p]], mesh, expect=[p], grad_placements=[[p], [p]])


def case_softmax(rank, world):
    import torch_vjp
    from torch.distributed.tensor import Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(2)
    x = torch.randn(4, 6, 8)
    for fn in (torch_vjp.softmax, torch_vjp.log_softmax):
        _check(lambda t: fn(t, dim=-1), [x], [[Shard(0)]], mesh, expect=[Shard(0)])
        _check(lambda t: fn(t, dim=-1), [x], [[Shard(1)]], mesh, expect=[Shard(1)])
        _check(lambda t: fn(t, dim=1), [x], [[Shard(1)]], mesh)  # the reduced dim: gathered, never wrong
        _check(lambda t: fn(t, dim=-1), [x], [[Replicate()]], mesh, expect=[Replicate()])
    _check(lambda t: torch_vjp.logsumexp(t, 1), [x], [[Shard(2)]], mesh, expect=[Shard(1)])
    _check(lambda t: torch_vjp.logsumexp(t, 1, keepdim=True), [x], [[Shard(2)]], mesh, expect=[Shard(2)])
    _check(lambda t: torch_vjp.logsumexp(t, 1), [x], [[Shard(0)]], mesh, expect=[Shard(0)])
    _check(lambda t: torch_vjp.logsumexp(t, 1), [x], [[Shard(1)]], mesh)
    _check(lambda t: torch_vjp.normalize(t, dim=-1), [x], [[Shard(0)]], mesh, expect=[Shard(0)])
    _check(lambda t: torch_vjp.normalize(t, dim=1), [x], [[Shard(2)]], mesh, expect=[Shard(2)])
    _check(lambda t: torch_vjp.normalize(t, dim=-1), [x], [[Shard(2)]], mesh)


def case_norms(rank, world):
    import torch_vjp
    from torch.distributed.tensor import Partial, Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(3)
    x, w, b = torch.randn(4, 6, 8), torch.randn(8), torch.randn(8)
    R = [Replicate()]
    rms = lambda t, wt: torch_vjp.rms_norm(t, [8], wt, 1e-5)  # noqa: E731
    ln = lambda t, wt, bt: torch_vjp.layer_norm(t, [8], wt, bt, 1e-5)  # noqa: E731
    for d in (0, 1):  # batch, sequence (sequence parallelism): local, the parameter gradients partial sums
        p = [Shard(d)]
        _check(rms, [x, w], [p, R], mesh, expect=p, grad_placements=[p, [Partial()]])
        _check(ln, [x, w, b], [p, R, R], mesh, expect=p, grad_placements=[p, [Partial()], [Partial()]])
        _check(lambda t: torch_vjp.rms_norm(t, [8]), [x], [p], mesh, expect=p)
        _check(lambda t: torch_vjp.layer_norm(t, [8]), [x], [p], mesh, expect=p)
    # the normalized dims sharded, and all replicated: gathered, exact
    for p in ([Shard(2)], R):
        _check(rms, [x, w], [p, R], mesh)
        _check(ln, [x, w, b], [p, R, R], mesh)
    _check(lambda t, wt: torch_vjp.rms_norm(t, [6, 8], wt), [x, torch.randn(6, 8)], [[Shard(1)], R], mesh)
    # the module, under sequence parallelism
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module
    torch.manual_seed(4)
    module = torch_vjp.nn.RMSNorm(8)
    with torch.no_grad():
        module.weight.copy_(torch.randn(8))
    ref_module = torch_vjp.nn.RMSNorm(8)
    ref_module.load_state_dict(module.state_dict())
    parallelize_module(module, mesh, SequenceParallel())
    xs = distribute_tensor(x, mesh, [Shard(1)])
    module(xs).to_local().pow(2).sum().backward()
    ref_module(x).pow(2).sum().backward()
    torch.testing.assert_close(module.weight.grad.full_tensor(), ref_module.weight.grad)


def case_losses(rank, world):
    import torch_vjp
    from torch.distributed.tensor import Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(5)
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    target[3] = -100
    R, S0 = [Replicate()], [Shard(0)]
    for reduction in ("none", "sum", "mean"):
        for smoothing in (0.0, 0.1):
            fn = lambda x, t: torch_vjp.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)  # noqa
            _check(fn, [logits, target], [S0, S0], mesh, expect=S0 if reduction == "none" else None)
            _check(fn, [logits, target], [R, R], mesh)
    # 'mean' over sharded rows: the local sums and the count reduced, the logits never gathered
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    xd = distribute_tensor(logits, mesh, S0).requires_grad_()
    with CommDebugMode() as comm:
        loss = torch_vjp.cross_entropy(xd, distribute_tensor(target, mesh, S0))
        loss.backward()
    assert not any("gather" in str(k) for k in comm.get_comm_counts()), comm.get_comm_counts()
    assert tuple(xd.grad.placements) == tuple(S0), xd.grad.placements
    h, w, bias = torch.randn(8, 6), torch.randn(10, 6), torch.randn(10)
    hd = distribute_tensor(h, mesh, S0).requires_grad_()
    with CommDebugMode() as comm:
        loss = torch_vjp.fused_linear_cross_entropy(hd, distribute_tensor(w, mesh, R),
                                                    distribute_tensor(target, mesh, S0))
        loss.backward()
    assert not any("gather" in str(k) for k in comm.get_comm_counts()), comm.get_comm_counts()
    assert tuple(hd.grad.placements) == tuple(S0), hd.grad.placements
    for reduction in ("none", "sum", "mean"):
        fn = lambda x, wt, t: torch_vjp.fused_linear_cross_entropy(x, wt, t, reduction=reduction)  # noqa
        _check(fn, [h, w, target], [S0, R, S0], mesh)
        _check(fn, [h, w, target], [R, R, R], mesh)
        fnb = lambda x, wt, t, b: torch_vjp.fused_linear_cross_entropy(  # noqa: E731
            x, wt, t, b, reduction=reduction, label_smoothing=0.05)
        _check(fnb, [h, w, target, bias], [S0, R, S0, R], mesh)
        # softcap and the z-loss are per element and per row: row-sharded and replicated DTensors take them
        fo = lambda x, wt, t: torch_vjp.fused_linear_cross_entropy(  # noqa: E731
            x, wt, t, reduction=reduction, softcap=2.0, lse_square_scale=0.1)
        _check(fo, [h, w, target], [S0, R, S0], mesh)
        fc = lambda x, t: torch_vjp.cross_entropy(x, t, reduction=reduction, softcap=2.0, lse_square_scale=0.1)  # noqa
        _check(fc, [logits, target], [S0, S0], mesh, expect=S0 if reduction == "none" else None)
        _check(fc, [logits, target], [R, R], mesh)


def _compiled(fn, compile):
    """fn, or fn through torch.compile(fullgraph=True) (inductor): the vocabulary-parallel losses, collectives
    and all, are one graph."""
    return torch.compile(fn, fullgraph=True) if compile else fn


def _vocab_case(mesh, placements, N, V, reduction, smoothing, ignore, loss_parallel_too=False, dtype=torch.float32,
                compile=False):
    import torch.nn.functional as F
    import torch_vjp
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    torch.manual_seed(N * 7 + V % 97)
    x = (torch.randn(N, V) * 3).to(dtype)
    # half types: the single-process kernel and the vocabulary-parallel one round differently (one bf16 ulp)
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    target = torch.randint(0, V, (N,))
    if ignore:
        target[1] = -100
    target[0] = V - 1  # owned by the last rank
    xr = x.clone().requires_grad_()
    ref = torch_vjp.cross_entropy(xr, target, reduction=reduction, label_smoothing=smoothing)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    xd = distribute_tensor(x, mesh, placements).requires_grad_()
    loss = _compiled(lambda a, t: torch_vjp.cross_entropy(a, t, reduction=reduction, label_smoothing=smoothing),
                     compile)(xd, target)
    assert isinstance(loss, DTensor) and all(p.is_replicate() for p in loss.placements), loss.placements
    loss.backward(distribute_tensor(gy, mesh, [Replicate()] * mesh.ndim))
    assert tuple(xd.grad.placements) == tuple(xd.placements), xd.grad.placements
    torch.testing.assert_close(loss.full_tensor(), ref, **tol)
    torch.testing.assert_close(xd.grad.full_tensor(), xr.grad, **tol)
    if loss_parallel_too:  # torch's own vocabulary-parallel loss, the reference to match
        from torch.distributed.tensor.parallel import loss_parallel
        xt = distribute_tensor(x, mesh, placements).requires_grad_()
        with loss_parallel():
            theirs = F.cross_entropy(xt, distribute_tensor(target, mesh, [Replicate()] * mesh.ndim),
                                     reduction=reduction, label_smoothing=smoothing)
            theirs.backward(distribute_tensor(gy, mesh, [Replicate()] * mesh.ndim))
        torch.testing.assert_close(loss.full_tensor(), theirs.full_tensor())
        torch.testing.assert_close(xd.grad.full_tensor(), xt.grad.full_tensor())


def case_vocab_parallel(rank, world):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.debug import CommDebugMode
    import torch_vjp
    mesh = _mesh((world,))
    for V in (32000, 128256):
        for reduction in ("mean", "sum", "none"):
            for smoothing in (0.0, 0.1):
                # torch's loss_parallel() fails with label smoothing (an in-place masked_fill_ on a Partial)
                _vocab_case(mesh, [Shard(1)], 4, V, reduction, smoothing, ignore=True,
                            loss_parallel_too=(V == 32000 and smoothing == 0.0))
    _vocab_case(mesh, [Shard(1)], 5, 1001, "mean", 0.2, ignore=True)  # uneven shards
    _vocab_case(mesh, [Shard(-1)], 3, 999, "none", 0.0, ignore=False)
    for reduction in ("mean", "none"):
        _vocab_case(mesh, [Shard(1)], 4, 1000, reduction, 0.1, ignore=True, dtype=torch.bfloat16)
    # only per-row all-reduces cross ranks: no all-gather of the logits, nothing in the backward
    from torch.distributed.tensor import distribute_tensor
    x = distribute_tensor(torch.randn(4, 64), mesh, [Shard(1)]).requires_grad_()
    t = torch.randint(0, 64, (4,))
    with CommDebugMode() as comm:
        loss = torch_vjp.cross_entropy(x, t, label_smoothing=0.1)
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    assert not any("gather" in k for k in counts), counts
    with CommDebugMode() as comm:
        loss.backward(retain_graph=True)
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    # not differentiable twice: a clear error, never a silent zero
    with pytest.raises(RuntimeError, match="(?i)twice|once_differentiable|does not require grad"):
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        g.full_tensor().sum().backward()


def _fused_case(mesh, tp_placements, N, H, V, reduction, smoothing, bias, dtensor_input, dtype=torch.float32,
                compile=False):
    import torch_vjp
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    torch.manual_seed(N * 11 + V % 89)
    h, w, b = torch.randn(N, H), torch.randn(V, H) / 4, torch.randn(V) if bias else None
    h, w, b = h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    target = torch.randint(0, V, (N,))
    target[1] = -100
    target[0] = V - 1
    R = [Replicate()] * mesh.ndim
    ref_in = [t.clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    ref = torch_vjp.fused_linear_cross_entropy(ref_in[0], ref_in[1], target, ref_in[2], reduction=reduction,
                                               label_smoothing=smoothing)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    hd = (distribute_tensor(h, mesh, R) if dtensor_input else h.clone()).requires_grad_()
    wd = distribute_tensor(w, mesh, tp_placements).requires_grad_()
    bd = distribute_tensor(b, mesh, tp_placements).requires_grad_() if bias else None
    loss = _compiled(lambda a, w_, t, b_: torch_vjp.fused_linear_cross_entropy(
        a, w_, t, b_, reduction=reduction, label_smoothing=smoothing), compile)(hd, wd, target, bd)
    assert isinstance(loss, DTensor) and all(p.is_replicate() for p in loss.placements), loss.placements
    loss.backward(distribute_tensor(gy, mesh, R))
    torch.testing.assert_close(loss.full_tensor(), ref, **tol)
    assert tuple(wd.grad.placements) == tuple(wd.placements), wd.grad.placements
    torch.testing.assert_close(wd.grad.full_tensor(), ref_in[1].grad, **tol)
    torch.testing.assert_close(hd.grad.full_tensor() if dtensor_input else hd.grad, ref_in[0].grad, **tol)
    if bias:
        torch.testing.assert_close(bd.grad.full_tensor(), ref_in[2].grad, **tol)


def case_vocab_parallel_fused(rank, world):
    from torch.distributed.tensor import Shard
    mesh = _mesh((world,))
    for V in (32000, 128256):
        for reduction in ("mean", "sum", "none"):
            for smoothing in (0.0, 0.1):
                _fused_case(mesh, [Shard(0)], 4, 16, V, reduction, smoothing, bias=False, dtensor_input=True)
    _fused_case(mesh, [Shard(0)], 6, 8, 1001, "mean", 0.1, bias=True, dtensor_input=False)  # uneven, bias
    _fused_case(mesh, [Shard(0)], 6, 8, 1000, "sum", 0.0, bias=True, dtensor_input=True)
    _fused_case(mesh, [Shard(0)], 6, 8, 1000, "mean", 0.1, bias=True, dtensor_input=True, dtype=torch.bfloat16)
    import torch_vjp.distributed as D  # several chunks of rows
    chunk, D._CHUNK_ELEMENTS = D._CHUNK_ELEMENTS, 1000
    try:
        _fused_case(mesh, [Shard(0)], 7, 8, 1000, "mean", 0.1, bias=True, dtensor_input=True)
    finally:
        D._CHUNK_ELEMENTS = chunk


def case_compile(rank, world):
    """torch.compile (fullgraph) of torch_vjp ops on DTensors under sequence parallelism, with the backward."""
    import torch_vjp
    from torch.distributed.tensor import Partial, Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(9)
    compiled = torch.compile(lambda t, wt: torch_vjp.silu(torch_vjp.rms_norm(t, [8], wt, 1e-6)), fullgraph=True)
    _check(compiled, [torch.randn(4, 6, 8), torch.randn(8)], [[Shard(1)], [Replicate()]], mesh, expect=[Shard(1)],
           grad_placements=[[Shard(1)], [Partial()]])


def case_errors(rank, world):
    import torch_vjp
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor
    mesh = _mesh((world,))
    other = DeviceMesh("cpu", list(reversed(range(world))))
    a = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)])
    b = distribute_tensor(torch.randn(4, 6), other, [Shard(0)])
    with pytest.raises(Exception, match="(?i)mesh"):
        torch_vjp.swiglu(a, b)
    logits = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    target = distribute_tensor(torch.randint(0, 6, (4,)), other, [Replicate()])
    with pytest.raises(ValueError, match="different meshes"):
        torch_vjp.cross_entropy(logits, target)
    # the loss options with vocabulary-parallel logits or head: refused, never a wrong answer
    local_target = torch.randint(0, 6, (4,))
    for options in ({"softcap": 2.0}, {"lse_square_scale": 0.1}):
        with pytest.raises(NotImplementedError, match="vocabulary-parallel"):
            torch_vjp.cross_entropy(logits, local_target, **options)
        with pytest.raises(NotImplementedError, match="vocabulary-parallel"):
            torch_vjp.fused_linear_cross_entropy(distribute_tensor(torch.randn(4, 5), mesh, [Replicate()]),
                                                 distribute_tensor(torch.randn(6, 5), mesh, [Shard(0)]),
                                                 distribute_tensor(local_target, mesh, [Replicate()]), **options)
    norm_w = distribute_tensor(torch.randn(6), other, [Replicate()])
    with pytest.raises(Exception, match="(?i)mesh"):
        torch_vjp.rms_norm(a, [6], norm_w)


def case_fsdp(rank, world):
    """A tiny model of torch_vjp.nn modules and the fused loss trained under fully_shard for a few steps:
    the losses and final parameters equal the single-process run's; also without resharding after forward and
    with activation checkpointing; with bf16 parameters (MixedPrecisionPolicy, fp32 reduce) to bf16 accuracy."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy
    _fsdp_run(rank, world)
    _fsdp_run(rank, world, reshard_after_forward=False, checkpoint=True)
    _fsdp_run(rank, world, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))


def case_fsdp_compiled(rank, world):
    """FSDP2 with each block through torch.compile (inductor, fullgraph), torchtitan's order: shard, then compile."""
    _fsdp_run(rank, world, compile=True)


def _fsdp_run(rank, world, reshard_after_forward=True, checkpoint=False, mp_policy=None, compile=False):
    import torch_vjp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils.checkpoint import checkpoint as ckpt
    mesh = _mesh((world,))
    mp_policy = mp_policy or MixedPrecisionPolicy()
    # bf16 parameters: the forward and backward in bf16, so only bf16 accuracy against the fp32 reference
    tol = {} if mp_policy.param_dtype is None else dict(atol=3e-2, rtol=3e-2)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch_vjp.nn.RMSNorm(16)
            self.up = torch.nn.Linear(16, 32, bias=False)
            self.gate = torch.nn.Linear(16, 32, bias=False)
            self.down = torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            h = self.norm(x)
            return x + self.down(torch_vjp.swiglu(self.gate(h), self.up(h)))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.norm = torch_vjp.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 50, bias=False)

        def forward(self, ids, target):
            x = self.embed(ids)
            for block in self.blocks:
                x = ckpt(block, x, use_reentrant=False) if checkpoint else block(x)
            h = self.norm(x).reshape(-1, 16)
            return torch_vjp.fused_linear_cross_entropy(h, self.head.weight, target.reshape(-1))

    torch.manual_seed(6)
    ref = Model()
    model = Model()
    model.load_state_dict(ref.state_dict())
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
        if compile:
            block.compile(fullgraph=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    steps = 5
    torch.manual_seed(7)
    data = [(torch.randint(0, 50, (2 * world, 6)), torch.randint(0, 50, (2 * world, 6))) for _ in range(steps)]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for ids, target in data:
        loss_ref = ref(ids, target)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        mine = slice(rank * 2, rank * 2 + 2)  # each rank its slice of the batch: mean of equal-count means
        loss = model(ids[mine], target[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total.float() / world, loss_ref.detach(), **tol)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), msg=lambda m: f"{name}: {m}", **tol)


def _example():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "distributed_llama.py")
    spec = importlib.util.spec_from_file_location("distributed_llama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example_case(dp, tp, steps=20, compile=False):
    """examples/distributed_llama.py on a (dp, tp) mesh: the loss curve and final parameters equal the
    single-process run's (eager)."""
    example = _example()
    ref_losses, ref_params = example.train(1, 1, steps, distributed=False)
    losses, params = example.train(dp, tp, steps, compile=compile)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses))
    assert ref_losses[-1] < ref_losses[0]
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], msg=lambda m: f"{name}: {m}")


def case_example_tp(rank, world):
    _example_case(1, world)


def case_example_fsdp_tp(rank, world):
    _example_case(2, world // 2)


def case_example_fsdp_tp_compiled(rank, world):
    """The 2-D (FSDP x TP) mesh with the example's --compile: FSDP over the dp dim, the blocks' parts compiled
    under tensor parallelism."""
    _example_case(2, world // 2, compile=True)


def case_vocab_parallel_compiled(rank, world):
    """The vocabulary-parallel cross_entropy and fused loss under torch.compile(fullgraph=True), backward too."""
    from torch.distributed.tensor import Shard
    mesh = _mesh((world,))
    _vocab_case(mesh, [Shard(1)], 6, 1000, "mean", 0.1, ignore=True, compile=True)
    _fused_case(mesh, [Shard(0)], 6, 8, 1000, "none", 0.0, bias=True, dtensor_input=False, compile=True)


def case_example_fsdp_compiled(rank, world):
    _example_case(world, 1, compile=True)


def case_example_tp_compiled(rank, world):
    """Tensor and sequence parallelism with the blocks' norms, attention and MLP compiled (the example's
    --compile under TP: see its train())."""
    _example_case(1, world, compile=True)


def case_mesh_2d(rank, world):
    """A 2 × 2 mesh: rows sharded on one mesh dim, the sequence or the vocabulary on the other."""
    import torch_vjp
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    mesh = _mesh((2, world // 2), ("dp", "tp"))
    torch.manual_seed(8)
    x, w, b = torch.randn(4, 6, 8), torch.randn(8), torch.randn(8)
    R2 = [Replicate(), Replicate()]
    p = [Shard(0), Shard(1)]
    _check(lambda t, wt: torch_vjp.rms_norm(t, [8], wt), [x, w], [p, R2], mesh, expect=p,
           grad_placements=[p, [Partial(), Partial()]])
    _check(lambda t, wt, bt: torch_vjp.layer_norm(t, [8], wt, bt), [x, w, b], [p, R2, R2], mesh, expect=p)
    _check(torch_vjp.silu, [x], [[Shard(2), Shard(0)]], mesh, expect=[Shard(2), Shard(0)])
    _check(lambda a, c: torch_vjp.swiglu(a, c), [x, x.flip(0)], [p, p], mesh, expect=p)
    _check(lambda t: torch_vjp.softmax(t, -1), [x], [[Shard(0), Shard(2)]], mesh)
    for reduction in ("mean", "none"):
        # torch's loss_parallel() takes 'mean' on a 1-D mesh only; ours on any
        _vocab_case(mesh, [Replicate(), Shard(1)], 4, 32000, reduction, 0.0, ignore=True,
                    loss_parallel_too=reduction != "mean")
        _vocab_case(mesh, [Replicate(), Shard(1)], 4, 32000, reduction, 0.1, ignore=True)
    for reduction in ("mean", "none"):
        _fused_case(mesh, [Replicate(), Shard(0)], 4, 16, 32000, reduction, 0.1, bias=True, dtensor_input=True)
    # a layout the vocabulary-parallel loss does not take: rows and classes both sharded
    logits = distribute_tensor(torch.randn(4, 10), mesh, [Shard(0), Shard(1)])
    with pytest.raises(ValueError, match="must be Replicate"):
        torch_vjp.cross_entropy(logits, torch.randint(0, 10, (4,)))
    head = distribute_tensor(torch.randn(10, 8), mesh, [Shard(0), Shard(0)])
    with pytest.raises(ValueError, match="Shard\\(0\\) on one mesh dim"):
        torch_vjp.fused_linear_cross_entropy(torch.randn(4, 8), head, torch.randint(0, 10, (4,)))


def case_rope(rank, world):
    """q and k sharded by heads (tensor parallelism: cos and sin replicated, their gradients Partial()) and by the
    sequence (cos and sin sharded alike), and replicated; values and every gradient against the full tensors."""
    import torch_vjp
    from torch.distributed.tensor import Replicate, Shard
    mesh = _mesh((world,))
    torch.manual_seed(2)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    cos, sin = torch.randn(2, 6, 8), torch.randn(2, 6, 8)

    def fn(q_, k_, c_, s_):
        q_embed, k_embed = torch_vjp.rope(q_, k_, c_, s_)
        return q_embed + 2 * k_embed

    R = Replicate()
    for rows, table, table_grad in ((Shard(1), R, None), (Shard(2), Shard(1), Shard(1)), (Shard(0), Shard(0), Shard(0)),
                                    (R, R, R)):
        grads = [[rows], [rows], None if table_grad is None else [table_grad], None if table_grad is None else [table_grad]]
        _check(fn, [q, k, cos, sin], [[rows], [rows], [table], [table]], mesh, expect=[rows], grad_placements=grads)


SUITES = {
    "two": [("elementwise", case_elementwise), ("gated", case_gated), ("softmax", case_softmax), ("rope", case_rope),
            ("norms", case_norms), ("losses", case_losses), ("vocab_parallel", case_vocab_parallel),
            ("vocab_parallel_fused", case_vocab_parallel_fused), ("errors", case_errors), ("fsdp", case_fsdp),
            ("example_tp", case_example_tp),
            ("compile", case_compile)],
    "four": [("mesh_2d", case_mesh_2d), ("example_fsdp_tp", case_example_fsdp_tp)],
    "two_compiled": [("fsdp_compiled", case_fsdp_compiled), ("example_fsdp_compiled", case_example_fsdp_compiled),
                     ("example_tp_compiled", case_example_tp_compiled),
                     ("vocab_parallel_compiled", case_vocab_parallel_compiled)],
    "four_compiled": [("example_fsdp_tp_compiled", case_example_fsdp_tp_compiled)],
}


# ---------------------------------------------------------------------------------------------------------
# The tests.

def test_every_op_has_a_sharding_rule():
    """Every op of the library and its VJP op: a DTensor sharding rule, or a DTensor op handler."""
    from torch.distributed.tensor import DTensor
    import torch_vjp.distributed  # noqa: F401
    from torch_vjp._ops import REGISTRY
    dispatcher = DTensor._op_dispatcher
    strategies = dispatcher.sharding_propagator.op_strategy_funcs
    missing = [name for op in REGISTRY for name in (op, op + "_backward")
               if getattr(torch.ops.torch_vjp, name).default not in strategies
               and getattr(torch.ops.torch_vjp, name).default not in dispatcher._custom_op_handlers]
    assert not missing and len(REGISTRY) >= 17, missing


@pytest.mark.parametrize("family", [name for name, _ in SUITES["two"]])
def test_two_processes(two, family):
    assert two.get(family) == "ok", two.get(family, "did not run")


@pytest.mark.parametrize("family", [name for name, _ in SUITES["four"]])
def test_four_processes(four, family):
    assert four.get(family) == "ok", four.get(family, "did not run")


@pytest.mark.parametrize("family", [name for name, _ in SUITES["two_compiled"]])
def test_two_processes_compiled(two_compiled, family):
    assert two_compiled.get(family) == "ok", two_compiled.get(family, "did not run")


@pytest.mark.parametrize("family", [name for name, _ in SUITES["four_compiled"]])
def test_four_processes_compiled(four_compiled, family):
    assert four_compiled.get(family) == "ok", four_compiled.get(family, "did not run")
