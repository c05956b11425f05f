"""torch_vjp.rope beyond the op table's checks (which see its two outputs concatenated, testing.OpInfo.joined): the
outputs themselves, transformers' layouts, the inverse rotation, partial rotary dims, type promotion, and errors."""
import pytest
import torch

import torch_vjp
from torch_vjp.rotary import reference


def tables(batch, seq, rotary, dtype=torch.float32, base=10000.0):
    """cos and sin as transformers' rotary embeddings make them: (batch, seq, rotary), duplicated halves."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
    positions = torch.arange(seq, dtype=torch.float64)[None, :, None] + torch.arange(batch)[:, None, None]
    angles = positions * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_outputs_are_q_and_k_shaped_and_bitwise_the_formula_in_float32(device):
    """(q_embed, k_embed) with q's and k's shapes and dtype; in float32 each product is rounded, then added, as
    torch's formula does: bitwise equal. Grouped-query attention: k has fewer heads than q."""
    q, k = torch.randn(2, 8, 5, 64, device=device), torch.randn(2, 2, 5, 64, device=device)
    cos, sin = (t.to(device) for t in tables(2, 5, 64))
    q_embed, k_embed = torch_vjp.rope(q, k, cos, sin)
    ref_q, ref_k = reference(q, k, cos, sin)
    assert q_embed.shape == q.shape and k_embed.shape == k.shape and q_embed.dtype == q.dtype
    assert torch.equal(q_embed, ref_q) and torch.equal(k_embed, ref_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_views_are_read_in_place_and_keep_their_layout(dtype, device):
    """transformers' q is a (B, S, H, D) projection viewed as (B, H, S, D); the output keeps that layout (as
    torch's elementwise formula does) and the values are the formula's. unsqueeze_dim=2 on the (B, S, H, D)
    view itself gives the same numbers."""
    projected = torch.randn(2, 5, 4, 16, device=device, dtype=dtype)  # (B, S, H, D)
    q = projected.transpose(1, 2)
    cos, sin = (t.to(device, dtype) for t in tables(2, 5, 16))
    q_embed, k_embed = torch_vjp.rope(q, q, cos, sin)
    ref_q, _ = reference(q.double(), q.double(), cos.double(), sin.double())
    torch.testing.assert_close(q_embed.double(), ref_q, **({} if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)))
    assert q_embed.stride() == q.stride()
    bshd, _ = torch_vjp.rope(projected, projected, cos, sin, unsqueeze_dim=2)
    assert torch.equal(bshd.transpose(1, 2), q_embed)


def test_backward_is_the_inverse_rotation(device):
    """With cos θ and sin θ duplicated over the halves, M is a rotation and the VJP Mᵀ its inverse: the gradient
    is rope at -θ (cos, -sin), and rope's backward of rope's output gives back the input."""
    q, k = torch.randn(2, 3, 7, 32, dtype=torch.float64, device=device), torch.randn(2, 1, 7, 32, dtype=torch.float64, device=device)
    cos, sin = (t.to(device) for t in tables(2, 7, 32, torch.float64))
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    leaves = q.clone().requires_grad_(), k.clone().requires_grad_()
    grads = torch.autograd.grad(torch_vjp.rope(*leaves, cos, sin), leaves, (dq, dk))
    expected = torch_vjp.rope(dq, dk, cos, -sin)
    torch.testing.assert_close(grads, expected, rtol=0, atol=1e-15)
    back = torch.ops.torch_vjp.rope_backward(*torch_vjp.rope(q, k, cos, sin), cos, sin, None, None, 1)
    torch.testing.assert_close(back[:2], (q, k))
    assert back[2] is None and back[3] is None


def test_partial_rotary_is_phis_slicing(device):
    """Phi's attention rotates the first rotary_ndims elements and concatenates the rest unchanged; rope does it
    when cos's last dim is smaller than the head dim (gradients too: the passed-through part's is dy)."""
    q, k = torch.randn(2, 4, 6, 32, device=device), torch.randn(2, 4, 6, 32, device=device)
    cos, sin = (t.to(device) for t in tables(2, 6, 8))
    leaves = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = torch_vjp.rope(*leaves, cos, sin)
    qr, kr = reference(q[..., :8], k[..., :8], cos, sin)
    assert torch.equal(out[0], torch.cat((qr, q[..., 8:]), -1)) and torch.equal(out[1], torch.cat((kr, k[..., 8:]), -1))
    dy = torch.randn_like(q)
    dq, dk = torch.autograd.grad(out, leaves, (dy, dy))
    assert torch.equal(dq[..., 8:], dy[..., 8:]) and torch.equal(dk, dq)


def test_one_output_unused_and_tables_not_requiring_grad(device):
    """Only q_embed in the loss: k's gradient is None (not zeros computed by a kernel); cos and sin not requiring
    grad are not differentiated, and when they do their gradients match the formula's."""
    q, k = torch.randn(2, 3, 4, 8, device=device, requires_grad=True), torch.randn(2, 3, 4, 8, device=device, requires_grad=True)
    cos, sin = (t.to(device) for t in tables(2, 4, 8))
    q_embed, _ = torch_vjp.rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad(q_embed.sum(), (q, k), allow_unused=True)
    assert dk is None and dq is not None
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    dy = torch.randn_like(q_embed)
    ours = torch.autograd.grad(torch_vjp.rope(q, k, cos, sin)[0], (q, cos, sin), dy)
    theirs = torch.autograd.grad(reference(q, k, cos, sin)[0], (q, cos, sin), dy)
    torch.testing.assert_close(ours, theirs)


def test_type_promotion_as_the_formula(device):
    """bfloat16 q and k with float32 cos and sin (transformers' embeddings under autocast) give float32, as the
    formula's multiplications promote; the value is the formula's on the widened q."""
    q, k = torch.randn(1, 2, 3, 8, device=device, dtype=torch.bfloat16), torch.randn(1, 2, 3, 8, device=device, dtype=torch.bfloat16)
    cos, sin = (t.to(device) for t in tables(1, 3, 8))
    out, ref = torch_vjp.rope(q, k, cos, sin), reference(q, k, cos, sin)
    assert out[0].dtype == ref[0].dtype == torch.float32
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_vmap_with_q_and_k_of_different_ranks_and_batched_tables(device):
    """vmap pads per-sample ranks so that cos and sin broadcast as they do per sample."""
    q, k = torch.randn(3, 2, 4, 5, 8, device=device, dtype=torch.float64), torch.randn(3, 2, 5, 8, device=device, dtype=torch.float64)
    cos, sin = torch.randn(3, 5, 8, device=device, dtype=torch.float64), torch.randn(3, 5, 8, device=device, dtype=torch.float64)
    fn = lambda q_, k_, c_, s_: torch_vjp.rope(q_, k_, c_, s_, 0)  # noqa: E731
    ref = lambda q_, k_, c_, s_: reference(q_, k_, c_, s_, 0)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(fn)(q, k, cos, sin), torch.func.vmap(ref)(q, k, cos, sin))
    grads = torch.func.vmap(torch.func.grad(lambda *a: sum(o.sum() for o in fn(*a)), argnums=(0, 1, 2, 3)))(q, k, cos, sin)
    expected = torch.func.vmap(torch.func.grad(lambda *a: sum(o.sum() for o in ref(*a)), argnums=(0, 1, 2, 3)))(q, k, cos, sin)
    torch.testing.assert_close(grads, expected)


@pytest.mark.parametrize("case,make,error,message", [
    ("odd rotary dim", lambda d: (torch.randn(2, 3, 4, 8), torch.randn(2, 4, 7)), RuntimeError, "even rotary dim"),
    ("rotary dim over head dim", lambda d: (torch.randn(2, 3, 4, 8), torch.randn(2, 4, 10)), RuntimeError, "exceeds"),
    ("no broadcast", lambda d: (torch.randn(2, 3, 4, 8), torch.randn(2, 5, 8)), RuntimeError, "do not broadcast"),
    ("unsqueeze at the end", lambda d: (torch.randn(2, 3, 4, 8), torch.randn(2, 4, 8), 3), RuntimeError, "last dim"),
    ("unsqueeze out of range", lambda d: (torch.randn(2, 3, 4, 8), torch.randn(2, 4, 8), 5), IndexError, "out of range"),
    ("0-d cos", lambda d: (torch.randn(2, 3, 4, 8), torch.tensor(1.0), 0), RuntimeError, "0-d"),
    ("complex", lambda d: (torch.randn(2, 3, 4, 8, dtype=torch.complex64), torch.randn(2, 4, 8, dtype=torch.complex64)),
     TypeError, "float32"),
])
def test_bad_input(case, make, error, message, device):
    q, cos, *u = make(device)
    with pytest.raises(error, match=message):
        torch_vjp.rope(q.to(device), q.to(device), cos.to(device), cos.to(device), *u)


def test_bad_argument_types():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="unsqueeze_dim"):
        torch_vjp.rope(q, q, q[0], q[0], 1.0)
    with pytest.raises(TypeError, match="'k' must be Tensor"):
        torch_vjp.rope(q, None, q[0], q[0])


# ---------------------------------------------------------------------------------------------------------
# rope from position ids (rope_cos_sin, rope_positions) against transformers' rotary embeddings.

def _rotary(family, **config):
    """A transformers rotary embedding module and its modeling file's apply_rotary_pos_emb, from a tiny config."""
    transformers = pytest.importorskip("transformers")
    import importlib
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = {"llama": "LlamaRotaryEmbedding", "phi3": "Phi3RotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding"}[family]
    make = {"llama": transformers.LlamaConfig, "phi3": transformers.Phi3Config, "qwen2": transformers.Qwen2Config}[family]
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                num_hidden_layers=1, vocab_size=32, max_position_embeddings=64)
    return getattr(module, cls)(make(**dict(base, **config))), module.apply_rotary_pos_emb


@pytest.mark.parametrize("family, config, theta", [
    ("llama", {}, 10000.0),
    ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6),  # another base
    ("phi3", {"partial_rotary_factor": 0.5}, 10000.0),  # rotary dim 8 of head dim 16: the rest passes through
], ids=["llama", "qwen2-theta-1e6", "phi3-partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_positions_is_transformers_rotary_embedding_and_apply_rotary_pos_emb(family, config, theta, dtype):
    """From position ids (offset rows, as with left padding or a KV cache): the tables are the rotary embedding
    module's bit for bit, and rope_positions' outputs and gradients are apply_rotary_pos_emb's with them (bit for
    bit in float32, as rope itself; in bfloat16 rope rounds once where the formula rounds each product and sum,
    so within bfloat16's rounding of the formula, against float64)."""
    rotary, apply_rotary_pos_emb = _rotary(family, **config)
    head_dim = 16
    rotary_dim = int(head_dim * config.get("partial_rotary_factor", 1.0))
    positions = torch.arange(7)[None] + torch.tensor([[0], [5]])  # (2, 7), the second row offset by 5
    hidden = torch.randn(2, 7, 64, dtype=dtype)
    cos, sin = rotary(hidden, positions)
    ours_cos, ours_sin = torch_vjp.rope_cos_sin(positions, dim=rotary_dim, theta=theta, dtype=dtype)
    assert torch.equal(ours_cos, cos) and torch.equal(ours_sin, sin)
    # the module's own inv_freq buffer (how scaled RoPE types are taken) gives the same tables
    assert torch.equal(torch_vjp.rope_cos_sin(positions, rotary.inv_freq, dtype=dtype)[0], cos)

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, head_dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 7, head_dim, generator=g).to(dtype).requires_grad_()
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    kwargs = dict(dim=rotary_dim) if rotary_dim != head_dim else {}
    out = torch_vjp.rope_positions(q, k, positions, theta=theta, **kwargs)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    grads = torch.autograd.grad(out, (q, k), (dq, dk))
    expected_grads = torch.autograd.grad(expected, (q, k), (dq, dk))
    if dtype == torch.float32:
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    else:
        exact = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
        for a, b, e in zip(out, expected, exact):
            assert a.dtype == dtype
            assert (a.double() - e).abs().max() <= (b.double() - e).abs().max() + 2 ** -8 * e.abs().max()


def test_rope_positions_takes_1d_positions_and_the_bshd_layout():
    """A 1-D position vector is one row of position ids (broadcast over the batch); unsqueeze_dim=2 takes the
    (batch, seq, heads, head_dim) projection itself."""
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)  # (B, S, H, D)
    positions = torch.arange(3, 8)
    out = torch_vjp.rope_positions(q, k, positions, unsqueeze_dim=2)
    cos, sin = torch_vjp.rope_cos_sin(positions[None].expand(2, 5), dim=16)
    expected = torch_vjp.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert all(torch.equal(a.transpose(1, 2), b) for a, b in zip(out, expected))
    with pytest.raises(TypeError, match="inv_freq or dim"):
        torch_vjp.rope_cos_sin(positions)
    with pytest.raises(ValueError, match="even"):
        torch_vjp.rope_cos_sin(positions, dim=7)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
], ids=lambda p: p["rope_type"])
def test_rope_cos_sin_takes_a_scaled_rope_modules_inv_freq_and_attention_scaling(rope_parameters):
    """Scaled RoPE types (YaRN scales cos and sin by its attention factor; Llama 3 rescales the frequencies):
    the module's inv_freq buffer and attention_scaling give its tables bit for bit, and rope_positions with them
    equals apply_rotary_pos_emb's result in float32."""
    rotary, apply_rotary_pos_emb = _rotary("llama", rope_parameters=rope_parameters)
    if rope_parameters["rope_type"] == "yarn":
        assert rotary.attention_scaling != 1.0  # the factor is exercised
    positions = torch.arange(40)[None] + torch.tensor([[0], [3]])
    cos, sin = rotary(torch.randn(2, 40, 64), positions)
    ours = torch_vjp.rope_cos_sin(positions, rotary.inv_freq, attention_scaling=rotary.attention_scaling)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)
    q, k = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16)
    out = torch_vjp.rope_positions(q, k, positions, rotary.inv_freq, attention_scaling=rotary.attention_scaling)
    assert all(torch.equal(a, b) for a, b in zip(out, apply_rotary_pos_emb(q, k, cos, sin)))
