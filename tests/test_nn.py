"""torch_vjp.nn: drop-in replacements for torch.nn's modules."""
import copy
import inspect
import pickle

import pytest
import torch

import torch_vjp
from torch_vjp.testing import MODULES, OPS_BY_NAME, sample


def cases():
    return [pytest.param(info, kwargs, id=f"{info.module.__name__}-{kwargs}") for info in MODULES
            for kwargs in info.constructions]


def test_every_module_is_tested_and_exported():
    """Every module has its MODULES row; FusedLinearCrossEntropyLoss, which torch.nn has no counterpart of,
    has its own test below."""
    assert {info.module.__name__ for info in MODULES} | {"FusedLinearCrossEntropyLoss"} == set(torch_vjp.nn.__all__)
    assert {info.op for info in MODULES} <= set(OPS_BY_NAME)


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")  # Softmax(): both warn (test_signatures.py)
@pytest.mark.parametrize("info,kwargs", cases())
def test_drop_in_for_torch_nn(info, kwargs, device):
    """Same constructor, attributes, repr and state_dict as the torch.nn module; the same values and
    gradients; either module loads the other's state_dict; it pickles and deep-copies. A module may add options
    of torch_vjp's op after torch's parameters, keyword-only with defaults that give torch's module (RMSNorm's
    offset and casting_mode): torch's constructor calls are its."""
    ours_signature, torch_signature = inspect.signature(info.module), inspect.signature(info.ref)
    ours_parameters, torch_parameters = list(ours_signature.parameters.values()), list(torch_signature.parameters.values())
    assert ours_parameters[:len(torch_parameters)] == torch_parameters
    assert ours_signature.return_annotation == torch_signature.return_annotation
    extra = ours_parameters[len(torch_parameters):]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in extra)
    ours, theirs = info.module(**kwargs), info.ref(**kwargs)
    assert isinstance(ours, info.ref)
    assert repr(ours) == repr(theirs) and ours.extra_repr() == theirs.extra_repr()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is info.module and repr(clone) == repr(ours)

    op = OPS_BY_NAME[info.op]
    x = sample(op, (2, 3, 4, 5), torch.float64, device)
    # A loss module's other input (targets), drawn by its row; a norm's parameters: the module's own, made
    # different from their initial ones (then loaded into torch's module too).
    extra = [op.call(x, **kwargs).kwargs["target"]] if op.family == "loss" else []
    ours, theirs = ours.to(device, torch.float64), theirs.to(device, torch.float64)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(sample(op, p.shape, torch.float64, device, generator_seed=3))
    theirs.load_state_dict(ours.state_dict())
    results = []
    for module in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y = module(leaf * 1, *extra)  # a non-leaf input, so inplace=True modules may write into it
        dy = sample(op, y.shape, torch.float64, device, generator_seed=1)
        params = list(module.parameters())
        results.append((y.detach(), torch.autograd.grad(y, [leaf, *params], dy)))
    torch.testing.assert_close(results[0], results[1])
    node = ours(x.clone().requires_grad_() * 1, *extra).grad_fn
    if kwargs.get("inplace"):  # the copy into the input, fed by the op's node
        assert node.name().endswith("CopyBackwards")
        node = next(fn for fn, _ in node.next_functions if fn is not None and fn.name() != "MulBackward0")
    while node.name() == "ViewBackward0":  # cross_entropy's (N, C, d) loss per position: the op's, reshaped
        node = node.next_functions[0][0]
    assert node.name() == "".join(p.title() for p in info.op.split("_")) + "Backward"


def test_modules_in_a_model_train_like_torch_nn():
    """A small model with torch_vjp.nn swapped in for torch.nn (activations, LayerNorm, RMSNorm and the loss)
    takes the same optimizer steps."""
    def model(nn):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), torch.nn.Linear(8, 8),
                                   nn.SiLU(inplace=True), nn.RMSNorm(8), torch.nn.Linear(8, 5)).double()

    x = torch.randn(16, 6, dtype=torch.float64)
    target = torch.randint(0, 5, (16,))
    steps = []
    for nn in (torch_vjp.nn, torch.nn):
        m = model(nn)
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        nn.CrossEntropyLoss(label_smoothing=0.1)(m(x), target).backward()
        optimizer.step()
        steps.append([p.detach().clone() for p in m.parameters()])
    torch.testing.assert_close(steps[0], steps[1])


def test_layer_norm_and_rms_norm_load_torch_state_dicts_of_any_dtype():
    """A torch module's state_dict loads (fp32 parameters into a module used with bf16 activations gives
    bf16 output, torch's rule), and the weight gradient comes back in the parameter's dtype."""
    for ours, theirs in ((torch_vjp.nn.LayerNorm(8), torch.nn.LayerNorm(8)), (torch_vjp.nn.RMSNorm(8), torch.nn.RMSNorm(8))):
        with torch.no_grad():
            for p in theirs.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
        y, y_ref = ours(x), theirs(x)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)
        y.sum().backward()
        assert ours.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_fused_linear_cross_entropy_loss_module():
    """FusedLinearCrossEntropyLoss(ignore_index, reduction, label_smoothing)(input, weight, target, bias)
    equals torch.nn.CrossEntropyLoss on the head's logits, gradients included; no state of its own."""
    module = torch_vjp.nn.FusedLinearCrossEntropyLoss(ignore_index=1, reduction="sum", label_smoothing=0.1)
    assert repr(module) == "FusedLinearCrossEntropyLoss(ignore_index=1, reduction='sum', label_smoothing=0.1)"
    assert module.state_dict() == {} and list(module.parameters()) == []
    head = torch.nn.Linear(6, 9, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 8, 3, 1])
    loss = module(x, head.weight, target, head.bias)
    expected = torch.nn.CrossEntropyLoss(ignore_index=1, reduction="sum", label_smoothing=0.1)(head(x), target)
    torch.testing.assert_close(loss, expected)
    params = [x, head.weight, head.bias]
    torch.testing.assert_close(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params))
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert repr(clone) == repr(module)
