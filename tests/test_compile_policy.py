"""The compile policy (torch_vjp/compile_policy.py): under torch.compile an op is either its opaque kernel or its
torch-ops form (VJPOp.decomposition). Both forms must compute the op: every op that has a decomposition is
run through torch.compile with the decomposition forced, values and gradients held to the same float64
reference and torch's own accuracy as the eager kernels (tests/test_values.py), with dynamic shapes and no
graph break. Eager, torch.export and calls below autograd keep the kernels whatever the policy says."""
import dataclasses

import pytest
import torch

import torch_vjp
from torch_vjp import compile_policy
from torch_vjp._ops import REGISTRY
from torch_vjp.testing import OPS_BY_NAME, op_variants, sample

from tests.test_values import check_against_reference

DECOMPOSABLE = [name for name, op in REGISTRY.items() if op.decomposition is not None]


@pytest.fixture
def policy(monkeypatch):
    """A private copy of the policy table, restored after the test, with dynamo's caches cleared around it."""
    monkeypatch.setattr(compile_policy, "DECOMPOSE", dict(compile_policy.DECOMPOSE))
    torch._dynamo.reset()
    yield compile_policy.DECOMPOSE
    torch._dynamo.reset()


def graph_targets(fn, *args):
    """The call_function targets of the graph Dynamo captures for fn(*args) (fullgraph)."""
    targets = []

    def backend(gm, inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets


def test_the_table_names_ops_with_a_decomposition_and_known_devices():
    for name, devices in compile_policy.DECOMPOSE.items():
        assert REGISTRY[name].decomposition is not None, name
        assert devices and set(devices) <= {"cpu", "cuda"}, (name, devices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("info,variant", [c for c in op_variants() if c.values[0].name in DECOMPOSABLE])
def test_decomposition_matches_the_reference_compiled(info, variant, dtype, policy):
    """The torch-ops form under torch.compile (aot_eager: dynamo and AOT autograd's backward), one compiled
    function over two shapes (dynamic), against the float64 reference to torch's accuracy."""
    policy[info.name] = frozenset({"cpu"})
    compiled = dataclasses.replace(info, op=torch.compile(info.op, backend="aot_eager", fullgraph=True, dynamic=True))
    for shape in [(7, 33), (3, 1025)]:
        check_against_reference(compiled, variant, sample(info, shape, dtype, "cpu"))


@pytest.mark.parametrize("name", DECOMPOSABLE)
def test_the_policy_decides_what_the_graph_holds(name, policy):
    info = OPS_BY_NAME[name]
    call = info.call(torch.randn(4, 9), **info.bench)

    def f(*primals):
        return call.op(*primals)

    policy.pop(name, None)
    assert f"torch_vjp.{name}" in graph_targets(f, *call.primals)
    torch._dynamo.reset()
    policy[name] = frozenset({"cpu"})
    assert not any(t.startswith("torch_vjp.") for t in graph_targets(f, *call.primals))
    torch._dynamo.reset()
    policy[name] = frozenset({"cuda"})  # another device's choice leaves the CPU's kernel
    assert f"torch_vjp.{name}" in graph_targets(f, *call.primals)


def test_export_and_eager_keep_the_kernel(policy):
    policy["silu"] = frozenset({"cpu"})

    class M(torch.nn.Module):
        def forward(self, x):
            return torch_vjp.silu(x)

    exported = torch.export.export(M(), (torch.randn(3, 4),))
    assert any("torch_vjp.silu" in str(node.target) for node in exported.graph.nodes)
    y = torch_vjp.silu(torch.randn(3, 4, requires_grad=True))
    assert type(y.grad_fn).__name__ == "SiluBackward"  # eager: the op's own Function


def test_autocast_value_of_a_decomposed_loss_is_torchs(policy):
    """Under CPU bfloat16 autocast the decomposed cross_entropy gives what eager gives (float32, of the bf16
    logits)."""
    policy["cross_entropy"] = frozenset({"cpu"})
    x = torch.randn(16, 100, requires_grad=True)
    t = torch.randint(0, 100, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = torch_vjp.cross_entropy(x @ torch.eye(100), t)
        compiled = torch.compile(lambda a, b: torch_vjp.cross_entropy(a @ torch.eye(100), b), fullgraph=True,
                                 backend="aot_eager")(x, t)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)
