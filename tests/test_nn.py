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
    assert {info.module.__name__ for info in MODULES} == set(torch_vjp.nn.__all__)
    assert {info.op for info in MODULES} <= set(OPS_BY_NAME)


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")  # Softmax(): both warn (test_signatures.py)
@pytest.mark.parametrize("info,kwargs", cases())
def test_drop_in_for_torch_nn(info, kwargs, device):
    """Same constructor, attributes, repr and state_dict as the torch.nn module; the same values and
    gradients; either module loads the other's state_dict; it pickles and deep-copies."""
    assert inspect.signature(info.module) == inspect.signature(info.ref)
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
    dy = sample(op, (2, 3, 4, 5), torch.float64, device, generator_seed=1)
    results = []
    for module in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y = module(leaf * 1)  # a non-leaf input, so inplace=True modules may write into it
        results.append((y.detach(), torch.autograd.grad(y, leaf, dy)[0]))
    torch.testing.assert_close(results[0], results[1])
    node = ours(x.clone().requires_grad_() * 1).grad_fn
    if kwargs.get("inplace"):  # the copy into the input, fed by the op's node
        assert node.name().endswith("CopyBackwards")
        node = next(fn for fn, _ in node.next_functions if fn is not None and fn.name() != "MulBackward0")
    assert node.name() == "".join(p.title() for p in info.op.split("_")) + "Backward"


def test_modules_in_a_model_train_like_torch_nn():
    """A small model with torch_vjp.nn swapped in for torch.nn takes the same optimizer step."""
    def model(nn):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), nn.GELU(), torch.nn.Linear(8, 8), nn.SiLU(inplace=True),
                                   torch.nn.Linear(8, 5), nn.LogSoftmax(dim=-1)).double()

    x = torch.randn(16, 6, dtype=torch.float64)
    target = torch.randint(0, 5, (16,))
    steps = []
    for nn in (torch_vjp.nn, torch.nn):
        m = model(nn)
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        torch.nn.functional.nll_loss(m(x), target).backward()
        optimizer.step()
        steps.append([p.detach().clone() for p in m.parameters()])
    torch.testing.assert_close(steps[0], steps[1])
