"""torch_vjp.transformers: patch() on tiny models built from configs (nothing is downloaded), every family
trained against stock transformers from the same initial state.

Why these sizes: two layers, hidden 32-64 and a 256-token vocabulary exercise every patched module (norms,
gated MLPs, MoE experts, attention with grouped keys, sliding windows and softcapping, the fused loss) in
well under a second per step on two CPU cores; the whole file is sized to run in about a minute and a
half (the PEFT tests about 20 s of it).
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the optional dependency: pip install torch_vjp[transformers]

import torch_vjp.transformers as tvt  # noqa: E402 (an ImportError here is a bug, not a missing package)

from transformers import (  # noqa: E402
    BertConfig, BertForMaskedLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
    GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, RobertaConfig, RobertaForMaskedLM,
)

VOCAB = 256
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(DECODER, head_dim=16)

# family -> (model class, config, expected report counts). Sliding windows (Mistral, Gemma2/3) are shorter than
# the sequence so that the sliding mask is exercised; Gemma2 softcaps attention scores and the final logits.
FAMILIES = {
    # Llama's decoder layer (Mistral, Qwen2, Qwen3, Qwen3-MoE and Gemma share it), Mixtral's (the same body, its
    # arguments in another order) and Phi3's (dropout on the residual branches): the first residual add and the
    # post-attention norm as one add_rms_norm per layer (residual_norms); Gemma2/3's: the add after the
    # post-attention norm and the pre-feedforward norm.
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**DECODER),
              dict(norms=5, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**DECODER, sliding_window=6),
                dict(norms=5, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2),
                dict(norms=5, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**DECODER),
              dict(norms=5, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    # Qwen3 adds per-head q/k norms: 2 more per layer.
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**GEMMA),
              dict(norms=9, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "qwen3_moe": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(**GEMMA, num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=48),
                  dict(norms=9, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "gemma": (GemmaForCausalLM, lambda: GemmaConfig(**GEMMA, hidden_act="gelu_pytorch_tanh"),
              dict(norms=5, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    # Gemma2/3: four norms per layer; Gemma3 adds q/k norms.
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(**GEMMA, sliding_window=6, final_logit_softcapping=30.0,
                                                       attn_logit_softcapping=50.0),
               dict(norms=9, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**GEMMA, sliding_window=6,
                                                           layer_types=["sliding_attention", "full_attention"]),
               dict(norms=13, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**DECODER),
             dict(norms=5, residual_norms=2, mlp=2, attention=2, rope=2, loss=1)),
    # GPT-2: ln_1, ln_2 per block and ln_f; its tanh-GELU activation modules.
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             dict(norms=5, activations=2, attention=2, loss=1)),
    # BERT/RoBERTa: embeddings, 2 per layer and the MLM head's LayerNorm; the intermediate and head activations.
    "bert": (BertForMaskedLM, lambda: BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             dict(norms=6, activations=3, attention=2, loss=1)),
    "roberta": (RobertaForMaskedLM, lambda: RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=96, vocab_size=VOCAB, pad_token_id=1,
                                                          max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0),
                dict(norms=6, activations=2, attention=2, loss=1)),  # its MLM head calls gelu, a function
}
CAUSAL = [name for name, (cls, _, _) in FAMILIES.items() if not cls.__name__.endswith("ForMaskedLM")]
STEPS = 5


def build(family, dtype=torch.float32):
    """A seeded stock model and a second one of the same weights, built from the SAME config object (so that the
    test sees whether patching one leaks into the other through the config)."""
    cls, make_config, _ = FAMILIES[family]
    torch.manual_seed(0)
    stock = cls(make_config()).to(dtype)
    twin = cls(stock.config).to(dtype)
    twin.load_state_dict(stock.state_dict())
    return stock, twin


def batch(family, seed=1, size=2, length=12):
    """Token ids, an attention mask whose second row ends in padding, and labels (-100 at padding; for
    masked-LM models only every third token is a target)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if family in ("bert", "roberta"):
        labels[:, 1::3] = -100
        labels[:, 2::3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train(model, inputs, steps=STEPS, autocast=None, lr=1e-3):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def max_difference(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def gradients(model, inputs, autocast=None):
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        model(**inputs).loss.backward()
    return [p.grad.double() for p in model.parameters()]


def gradient_error(ours, reference):
    """The largest error of any parameter's gradient relative to that gradient's size; a gradient that is zero in
    exact arithmetic (a key projection's bias) is measured against the largest one instead."""
    floor = 1e-4 * max(r.abs().max().item() for r in reference)
    return max((o - r).abs().max().item() / max(r.abs().max().item(), floor) for o, r in zip(ours, reference))


def checkpointing(model, on):
    """Gradient (activation) checkpointing on or off, under either of transformers' names for it."""
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def snapshot(model):
    """Each module's instance attribute names and the identity of the config it holds."""
    return {name: (set(m.__dict__), id(m.__dict__.get("config"))) for name, m in model.named_modules()}


def untouched(model):
    """No instance attribute torch_vjp sets is on any module of `model`."""
    return all("forward" not in m.__dict__ and "_apply_gate" not in m.__dict__ and "_loss_function" not in m.__dict__
               for m in model.modules())


@pytest.fixture(autouse=True)
def quiet_and_single_threaded():
    """Tiny models: a second intra-op thread only adds synchronisation (and the CI machine has two cores)."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_training_matches_stock_and_leaves_the_stock_model_alone(family):
    """Gradients to float32 round-off, then AdamW steps: losses to round-off, parameters within 5e-5. AdamW divides
    each gradient by its own running size, so a gradient that round-off changes in relative terms (one that is
    nearly zero) moves its parameter by up to lr per step either way: stock's own sdpa and eager attention end
    up to 3e-5 apart here, at lr = 1e-3."""
    stock, model = build(family)
    implementation = stock.config._attn_implementation
    parameters = list(model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    report = tvt.patch(model)

    _, _, counts = FAMILIES[family]
    assert report.counts == counts, str(report)
    assert all(model.get_submodule(name) is not None for names in report.replaced.values() for name in names)
    # The same Parameter objects (an optimizer built before patch() goes on), weight tying kept.
    assert all(p is q for p, q in zip(model.parameters(), parameters)) and len(list(model.parameters())) == len(
        parameters)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert report.attention == "torch_vjp" and model.config._attn_implementation == "torch_vjp"
    # The stock model shares the config object the patched one was built from: still stock.
    assert stock.config._attn_implementation == implementation and untouched(stock)
    assert set(model.state_dict()) == set(stock.state_dict())
    inputs = batch(family)
    assert gradient_error(gradients(model, inputs), gradients(stock, inputs)) < 1e-5
    losses, stock_losses = train(model, inputs), train(stock, inputs)
    torch.testing.assert_close(losses, stock_losses, rtol=0, atol=5e-6)
    assert max_difference(model, stock) < 5e-5
    assert untouched(stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_is_as_accurate_as_stock(family):
    """Under bfloat16 CPU autocast the patched model is as close to a float64 stock model as stock's own bfloat16
    run is: gradients within 1.5x stock's error; losses over AdamW steps within 1.5x, plus one bfloat16 rounding
    of the loss value, which the fused loss makes under autocast (see the README's autocast notes)."""
    stock, model = build(family)
    reference = copy.deepcopy(stock).double()
    if family in ("mixtral", "qwen3_moe"):
        reference.set_experts_implementation("eager")  # torch's grouped_mm has no float64 kernel
    tvt.patch(model)
    inputs = batch(family)
    exact = gradients(reference, inputs)
    ours, theirs = gradients(model, inputs, torch.bfloat16), gradients(stock, inputs, torch.bfloat16)
    assert gradient_error(ours, exact) <= 1.5 * gradient_error(theirs, exact) + 1e-3
    steps = 2
    exact = train(reference, inputs, steps)
    ours, theirs = train(model, inputs, steps, torch.bfloat16), train(stock, inputs, steps, torch.bfloat16)
    assert ((ours - exact).abs() <= 1.5 * (theirs - exact).abs().max() + 2 ** -8 * exact.abs()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_generate_checkpointing_and_unpatch(family, tmp_path):
    stock, model = build(family)
    checkpointing(model, True), checkpointing(model, False)  # the attributes it leaves behind, before the snapshot
    before = snapshot(model)
    report = tvt.patch(model)
    train(model, batch(family), steps=1)
    model.eval()

    # A stock class loads what the patched model saves, and computes what the patched model computes.
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert untouched(loaded) and loaded.config._attn_implementation != "torch_vjp"
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    inputs = batch(family, seed=2)
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, loaded(**inputs).logits, rtol=1e-5, atol=1e-5)
    if family in CAUSAL:  # greedy decoding, with the KV cache, token for token
        prompt = inputs["input_ids"][:, :5]
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs))

    # Gradient checkpointing recomputes the patched modules: the same gradients.
    model.train()
    inputs = batch(family)
    model.zero_grad()
    model(**inputs).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    checkpointing(model, True)
    model.zero_grad()
    norm = model.get_submodule(next(name for name in report.replaced["norms"] if ".0." in name))  # in layer 0
    calls = []
    hook = norm.register_forward_hook(lambda *_: calls.append(1))
    model(**inputs).loss.backward()
    hook.remove()
    assert len(calls) == 2  # the layer ran again in the backward: checkpointing was on, through the patched norm
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-6, atol=1e-7)
    checkpointing(model, False)

    # unpatch gives back the stock model: no instance attributes, its own config, stock's outputs bit for bit.
    tvt.unpatch(model)
    assert untouched(model) and not tvt.is_patched(model)
    # Every module holds the attributes it held before patch(), and its own config object again.
    assert snapshot(model) == before
    assert model.config._attn_implementation == loaded.config._attn_implementation
    model.eval()
    with torch.no_grad():
        inputs = batch(family, seed=3)
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
        assert torch.equal(model(**inputs).loss, loaded(**inputs).loss)


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"])
def test_norms_match_the_eager_modules_bit_for_bit(family):
    """The patched norms keep each model's casting rule: Llama's RMSNorm through rms_norm's casting_mode="llama"
    (normalise in float32, cast, scale), Gemma's through offset=1.0 (scale by 1 + weight in float32, cast after;
    no `1 + weight` built per call), LayerNorm as torch's. Every patched norm gives its eager module's bits for
    bfloat16 and float32 activations, beside bfloat16 or float32 parameters (a float32 weight beside bfloat16
    input gives Llama's float32 output). LayerNorm: bfloat16 activations only (torch's layer_norm kernel sums
    in another order; float32 is round-off)."""
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5)) * 3
    for dtype in (torch.bfloat16, torch.float32):
        stock, model = build(family, dtype)
        with torch.no_grad():  # weights away from their initial ones and zeros
            for name, p in stock.named_parameters():
                if "norm" in name or "ln_" in name:
                    p.normal_(0.5, 0.3)
        model.load_state_dict(stock.state_dict())
        names = tvt.patch(model).replaced["norms"]
        assert names
        for name in names:
            ours, theirs = model.get_submodule(name), stock.get_submodule(name)
            width = ours.weight.shape[-1]
            for x_dtype in (torch.bfloat16, torch.float32):
                inputs = x[..., :width].to(x_dtype)
                if family == "gpt2" and x_dtype == torch.float32:  # (bfloat16 parameters: refused, as torch's)
                    if dtype == torch.float32:
                        torch.testing.assert_close(ours(inputs), theirs(inputs), rtol=1e-6, atol=2e-6)
                    continue
                out, expected = ours(inputs), theirs(inputs)
                assert out.dtype == expected.dtype and torch.equal(out, expected), (family, dtype, x_dtype, name)


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
                                    "gemma3", "phi3"])
def test_patched_norms_give_the_stock_models_logits_bit_for_bit(family):
    """With only the norms patched (each decoder layer's residual add + the norm after it through add_rms_norm,
    Llama's or Gemma's casting rule; every RMSNorm through rms_norm's options), a whole model's logits and hidden states are stock's
    bits, in float32 and bfloat16; the gradients of a loss match stock to round-off."""
    for dtype in (torch.float32, torch.bfloat16):
        stock, model = build(family, dtype)
        report = tvt.patch(model, mlp=False, attention=False, rope=False, loss=None)
        assert report.counts.get("residual_norms", 0) == FAMILIES[family][2].get("residual_norms", 0)
        ids = batch(family)["input_ids"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, stock(ids).logits), (family, dtype)
    stock, model = build(family)
    tvt.patch(model, mlp=False, attention=False, rope=False, loss=None)
    inputs = batch(family)
    for m in (stock, model):
        m(**inputs).loss.backward()
    for (name, p), q in zip(stock.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def ops_run(model, inputs, *names):
    """Whether a forward and backward of `model` ran every one of the torch_vjp ops `names` (profiler op names)."""
    from torch.profiler import profile
    with profile() as prof:
        model(**inputs).loss.backward()
    seen = {event.name for event in prof.events()}
    return all(f"torch_vjp::{name}" in seen for name in names)


@pytest.mark.parametrize("family", ["mixtral", "gemma", "gemma2", "gemma3", "phi3"])
def test_residual_norms_run_add_rms_norm_where_the_layer_has_one(family):
    """The families added to residual_norms run the add_rms_norm kernels (forward and backward) in place of the
    residual add + the norm after it: Mixtral's post-attention norm (Llama's), Gemma's (1 + weight), Gemma2/3's
    pre-feedforward norm after the post-attention one, Phi3's after its residual dropout. The stock model runs none."""
    stock, model = build(family)
    report = tvt.patch(model, mlp=False, attention=False, rope=False, loss=None)
    assert report.counts == dict(norms=FAMILIES[family][2]["norms"], residual_norms=2), str(report)
    inputs = batch(family)
    assert ops_run(model, inputs, "add_rms_norm", "add_rms_norm_backward")
    assert not ops_run(stock, inputs, "add_rms_norm")
    tvt.unpatch(model)
    assert not ops_run(model, inputs, "add_rms_norm")


def test_phi3_residual_dropout_draws_the_stock_masks():
    """Phi3 with dropout on its residual branches (resid_pdrop) in training: the dropout modules run as stock's,
    from the same generator state, before add_rms_norm, so with the norms patched the loss is stock's bit for bit
    and the gradients match to round-off, over several draws."""
    torch.manual_seed(0)
    config = Phi3Config(**DECODER, resid_pdrop=0.3, attention_dropout=0.0)
    stock = Phi3ForCausalLM(config)
    model = cls_copy(stock)
    report = tvt.patch(model, mlp=False, attention=False, rope=False, loss=None)
    assert report.counts["residual_norms"] == 2
    inputs = batch("phi3")
    stock.train(), model.train()
    for seed in range(3):
        losses = []
        for m in (stock, model):
            m.zero_grad()
            torch.manual_seed(seed)
            loss = m(**inputs).loss
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[1], losses[0]), seed
        for (name, p), q in zip(stock.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # the dropout did drop: another seed gives another loss
    torch.manual_seed(99)
    assert not torch.equal(model(**inputs).loss.detach(), losses[1])


def test_padding_is_masked():
    """With the mask function registered, a padded batch gives each sample's unpadded result (left padding for a
    causal model, right padding for BERT): the model did not run unmasked."""
    for family, side in (("llama", "left"), ("bert", "right")):
        _, model = build(family)
        tvt.patch(model)
        model.eval()
        ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
        mask = torch.ones_like(ids)
        real = slice(4, None) if side == "left" else slice(None, 6)
        mask[1] = 0
        mask[1, real] = 1
        kwargs = {}
        if side == "left":
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask, **kwargs).logits[1, real]
            alone = model(input_ids=ids[1:, real]).logits[0]
            unmasked = model(input_ids=ids, **kwargs).logits[1, real]
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
        assert (unmasked - alone).abs().max() > 1e-3  # the comparison can tell a missing mask


def test_loss_options_follow_transformers():
    """num_items_in_batch (sum / count, gradient accumulation), shift_labels, ignore_index, return_logits, eval mode,
    loss='ce' and loss=None, each against stock."""
    stock, fused = build("llama")
    ce, untouched_loss = cls_copy(stock), cls_copy(stock)
    assert tvt.patch(fused).loss == "fused"
    assert tvt.patch(ce, loss="ce").loss == "ce"
    report = tvt.patch(untouched_loss, loss=None)
    assert report.loss is None and "_loss_function" not in untouched_loss.__dict__
    inputs = batch("llama")
    count = (inputs["labels"][:, 1:] != -100).sum()
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    for model in (stock, fused, ce, untouched_loss):
        model.train()
    # The fused forward never forms the logits: the head hands its input on (hidden size, not the vocabulary).
    shapes = []
    hook = fused.lm_head.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    fused(**inputs)
    hook.remove()
    assert shapes == [(2, 12, 64)]
    cases = [dict(), dict(num_items_in_batch=count * 3), dict(num_items_in_batch=int(count) + 5),
             dict(shift_labels=shifted, labels=torch.zeros_like(shifted))]
    for extra in cases:
        arguments = {**inputs, **extra}
        expected = stock(**arguments)
        expected.loss.backward()
        for model in (fused, ce, untouched_loss):
            out = model(**arguments)
            torch.testing.assert_close(out.loss, expected.loss, rtol=2e-6, atol=2e-6)
            assert (out.logits is None) == (model is fused)
            model.zero_grad()
            out.loss.backward()
            assert max((p.grad - q.grad).abs().max().item()
                       for p, q in zip(model.parameters(), stock.parameters())) < 1e-6
        stock.zero_grad()
    out = fused(**inputs, return_logits=True)
    assert out.logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(out.loss, stock(**inputs).loss, rtol=2e-6, atol=2e-6)
    fused.eval()
    assert fused(**inputs).logits is not None
    fused.train()
    as_tuple = fused(**inputs, return_dict=False)
    assert as_tuple[0].dim() == 0 and not any(torch.is_tensor(t) and t.shape[-1:] == (VOCAB,) for t in as_tuple)


def cls_copy(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def test_gemma2_softcapping_is_fused_into_the_loss():
    """Gemma2's final-logit softcapping (logits = c·tanh(logits / c)) goes into the fused loss as its softcap=c: the
    report says "fused" and skips no loss, the training forward runs fused_linear_cross_entropy and forms no logits,
    and the loss and every parameter gradient are stock's to float32 round-off (the training test's standards),
    with the head scaled so that the logits reach the curve of the tanh (without softcapping the loss is far off).
    The model's own softcapping is off for that call only: the config holds c again after it, also after a forward
    that raises, and the logits path (eval mode, return_logits=True, no labels, generate, unpatch) softcaps as
    stock's and takes its loss from those logits."""
    stock, model = build("gemma2")
    c = stock.config.final_logit_softcapping
    assert c == 30.0
    with torch.no_grad():  # logits up to about c (from under 1): the softcap changes the loss
        for m in (stock, model):
            m.lm_head.weight.mul_(30)
    report = tvt.patch(model)
    assert report.loss == "fused" and not [r for r in report.not_patched if r[0] == "loss"], str(report)
    inputs = batch("gemma2")
    stock.train(), model.train()
    head_outputs = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: head_outputs.append(output.shape))
    out = model(**inputs)
    hook.remove()
    assert out.logits is None and head_outputs == [(2, 12, 64)]  # the hidden states went on, not logits
    expected = stock(**inputs)
    assert expected.logits.abs().max() > c / 2
    torch.testing.assert_close(out.loss, expected.loss, rtol=2e-6, atol=2e-6)
    stock.zero_grad()
    expected.loss.backward()
    out.loss.backward()
    reference = [p.grad.double() for p in stock.parameters()]
    assert gradient_error([p.grad.double() for p in model.parameters()], reference) < 1e-5
    assert ops_run(model, inputs, "fused_linear_cross_entropy")
    assert model.config.final_logit_softcapping == c and stock.config.final_logit_softcapping == c
    assert model.lm_head._torch_vjp_softcap is None and not model.lm_head._torch_vjp_pass_hidden
    # the softcap matters here: the loss of the logits without it is far from stock's
    stock.config.final_logit_softcapping = None
    assert (stock(**inputs).loss - expected.loss).abs() > 1e-2
    stock.config.final_logit_softcapping = c

    # A forward that raises inside the model (here, from a hook on the decoder) leaves the config and head as
    # they were; the softcap was off only while the fused forward ran.
    seen = []

    def fail(module, args, kwargs):
        seen.append(model.config.final_logit_softcapping)
        raise RuntimeError("stop")

    hook = model.model.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(RuntimeError, match="stop"):
        model(**inputs)
    hook.remove()
    assert seen == [None] and model.config.final_logit_softcapping == c
    assert model.lm_head._torch_vjp_softcap is None and not model.lm_head._torch_vjp_pass_hidden

    # The logits path keeps the model's own softcapping and takes the loss from the softcapped logits.
    out = model(**inputs, return_logits=True)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=2e-6, atol=2e-6)
    model.zero_grad()
    out.loss.backward()
    assert gradient_error([p.grad.double() for p in model.parameters()], reference) < 1e-5
    model.eval(), stock.eval()
    with torch.no_grad():
        out, expected = model(**inputs), stock(**inputs)
        assert out.logits.abs().max() < c
        torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, expected.loss, rtol=2e-6, atol=2e-6)
        unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
        torch.testing.assert_close(model(**unlabelled).logits, expected.logits, rtol=1e-5, atol=1e-5)
        prompt = inputs["input_ids"][:, :5]
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))
    assert model.config.final_logit_softcapping == c
    tvt.unpatch(model)
    assert untouched(model) and model.config.final_logit_softcapping == c
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected.logits, rtol=1e-5, atol=1e-5)

    # Without softcapping the same family takes the fused loss with no softcap; the config's value is read per
    # call, so one set after patch() is fused too.
    config = Gemma2Config(**GEMMA, final_logit_softcapping=None)
    torch.manual_seed(0)
    stock = Gemma2ForCausalLM(config)
    model = cls_copy(stock)
    assert tvt.patch(model).loss == "fused"
    stock.train(), model.train()
    torch.testing.assert_close(model(**inputs).loss, stock(**inputs).loss, rtol=2e-6, atol=2e-6)
    model.config.final_logit_softcapping = stock.config.final_logit_softcapping = 0.5
    out, expected = model(**inputs), stock(**inputs)
    assert out.logits is None and model.config.final_logit_softcapping == 0.5
    torch.testing.assert_close(out.loss, expected.loss, rtol=2e-6, atol=2e-6)


def test_gemma3_softcapping_is_fused_into_the_loss():
    """Gemma3 (text) runs the same softcapping code as Gemma2 when its config sets final_logit_softcapping: the
    fused loss takes it, and the loss and gradients are stock's to round-off."""
    torch.manual_seed(0)
    stock = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, sliding_window=6, final_logit_softcapping=5.0,
                                               layer_types=["sliding_attention", "full_attention"]))
    model = cls_copy(stock)
    with torch.no_grad():
        for m in (stock, model):
            m.lm_head.weight.mul_(10)
    report = tvt.patch(model)
    assert report.loss == "fused" and not [r for r in report.not_patched if r[0] == "loss"], str(report)
    inputs = batch("gemma3")
    assert gradient_error(gradients(model, inputs), gradients(stock, inputs)) < 1e-5
    stock.train(), model.train()
    torch.testing.assert_close(model(**inputs).loss, stock(**inputs).loss, rtol=2e-6, atol=2e-6)
    assert model(**inputs).logits is None and model.config.final_logit_softcapping == 5.0


def test_a_softcap_the_fused_loss_does_not_take_falls_back_and_says_why():
    """Another form of final-logit softcapping between the head and the loss (here the block with a line added)
    sends a model with it set to logits + cross_entropy, with the reason; with it off the fused loss is used."""
    source = """
class Capped(Gemma2ForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        if self.config.final_logit_softcapping is not None:
            logits = logits.float() / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
"""
    import linecache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    filename = "<test_transformers: Capped>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(Gemma2ForCausalLM=Gemma2ForCausalLM, torch=torch, CausalLMOutputWithPast=CausalLMOutputWithPast)
    exec(compile(source, filename, "exec"), namespace)
    capped = namespace["Capped"]
    report = tvt.patch(capped(Gemma2Config(**GEMMA, final_logit_softcapping=30.0)))
    assert report.loss == "ce" and any(kind == "loss" and "final_logit_softcapping is set" in reason
                                       for kind, _, reason in report.not_patched), str(report)
    torch.manual_seed(0)
    model = capped(Gemma2Config(**GEMMA, final_logit_softcapping=None))
    assert tvt.patch(model).loss == "fused"
    model.train()
    inputs = batch("gemma2")
    assert model(**inputs).logits is None
    model.config.final_logit_softcapping = 30.0  # set after patch(): that form is the model's own, on the logits
    out = model(**inputs)
    assert out.logits is not None and out.logits.dtype == torch.float32 and torch.isfinite(out.loss)


def test_mixtral_router_aux_loss_and_eager_experts():
    """The fused loss takes the router's auxiliary loss added in place; an eager experts loop is reported, not
    patched."""
    stock, model = build("mixtral")
    tvt.patch(model)
    inputs = dict(batch("mixtral"), output_router_logits=True)
    model.train(), stock.train()
    ours, theirs = model(**inputs), stock(**inputs)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=2e-6, atol=2e-6)
    ours.loss.backward()

    config = MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")
    report = tvt.patch(MixtralForCausalLM(config))
    experts = [(name, reason) for kind, name, reason in report.not_patched if kind == "mlp"]
    assert len(experts) == 2 and all("eager experts loop" in reason for _, reason in experts)


def test_a_family_it_does_not_know_is_patched_where_it_shares_modules():
    """OLMo: Llama's MLP and attention, but a LayerNorm of its own without parameters: reported, left stock."""
    from transformers import OlmoConfig, OlmoForCausalLM
    torch.manual_seed(0)
    stock = OlmoForCausalLM(OlmoConfig(**DECODER))
    model = cls_copy(stock)
    report = tvt.patch(model)
    assert report.counts == dict(mlp=2, attention=2, rope=2, loss=1)
    assert len([1 for kind, name, reason in report.not_patched if kind == "norms" and "OlmoLayerNorm" in reason]) == 5
    # its decoder layer is Llama's, but its post-attention norm is not an RMSNorm torch_vjp patches: reported, stock
    reasons = [reason for kind, _, reason in report.not_patched if kind == "residual_norms"]
    assert len(reasons) == 2 and all("post_attention_layernorm is not a Llama or Gemma RMSNorm" in r for r in reasons)
    inputs = batch("llama")
    torch.testing.assert_close(train(model, inputs, 3), train(stock, inputs, 3), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "mixtral", "phi3", "gemma2"])
def test_torch_compile(family):
    """A patched Llama compiles as one graph (fullgraph=True: no break at the patched modules, the attention
    function or the fused loss's head hand-off) and trains like the eager patched model; so do the other decoder
    layer forms whose residual add and norm run as add_rms_norm (Mixtral's, Phi3's, Gemma2's; Gemma2's final-logit
    softcap, turned off in its config for the call, goes to the fused loss). The aot_eager
    backend (dynamo and AOT autograd without code generation) keeps the test fast; inductor was checked by hand
    (for Llama).

    Compiled, several ops run their torch-ops forms on the CPU (torch_vjp/compile_policy.py), so the compiled
    model is the eager one to round-off, not bit for bit. For Llama that stays under 1e-6 after two AdamW steps;
    for the others the gradients are held to the training test's 1e-5 and the parameters to its 5e-5 (AdamW
    moves a parameter whose gradient is round-off-sized by up to lr a step: see that test). Patching these models
    with norms=False (no add_rms_norm) gave compiled-vs-eager parameter differences of the same size (Mixtral
    1.3e-5, Phi3 4.3e-6; measured when this test was written)."""
    stock, model = build(family)
    tvt.patch(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = batch(family)
    if family != "llama":
        assert gradient_error(gradients(compiled, inputs), gradients(eager, inputs)) < 1e-5
    torch.testing.assert_close(train(compiled, inputs, 2), train(eager, inputs, 2), rtol=1e-6, atol=1e-6)
    assert max_difference(model, eager) < (1e-6 if family == "llama" else 5e-5)
    # Gemma2's softcap went into the compiled fused loss; its config holds the value again
    assert getattr(model.config, "final_logit_softcapping", None) == getattr(stock.config, "final_logit_softcapping",
                                                                             None)


def test_patch_is_idempotent_and_refuses_mixed_options():
    _, model = build("llama")
    report = tvt.patch(model)
    assert tvt.patch(model) is report
    with pytest.raises(RuntimeError, match="already patched"):
        tvt.patch(model, attention=False)
    tvt.unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        tvt.unpatch(model)
    with pytest.raises(ValueError, match="loss must be"):
        tvt.patch(model, loss="liger")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        tvt.patch(torch.nn.Linear(2, 2))
    report = tvt.patch(model, norms=False, mlp=False, attention=False, rope=False, loss=None)
    assert report.replaced == {} and report.attention is None and untouched(model)
    tvt.unpatch(model)
    # A change made to the (private) config while patched is carried over to the model's own config.
    config = model.config
    tvt.patch(model)
    assert model.config is not config
    flipped = not config.use_cache
    model.config.use_cache = flipped
    tvt.unpatch(model)
    assert model.config is config and config.use_cache == flipped


def test_a_head_swapped_in_after_patch_takes_the_plain_path():
    stock, model = build("llama")
    tvt.patch(model)
    model.resize_token_embeddings(VOCAB + 8), stock.resize_token_embeddings(VOCAB + 8)
    model.lm_head.weight.data.copy_(stock.lm_head.weight.data)
    model.model.embed_tokens.weight.data.copy_(stock.model.embed_tokens.weight.data)
    inputs = batch("llama")
    model.train(), stock.train()
    torch.testing.assert_close(model(**inputs).loss, stock(**inputs).loss, rtol=0, atol=2e-6)


def test_a_deep_copy_of_a_patched_model_runs_its_own_parameters():
    _, model = build("llama")
    tvt.patch(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    inputs = batch("llama")
    inputs.pop("labels")
    model.eval(), twin.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, twin(**inputs).logits)
    tvt.unpatch(twin)
    assert untouched(twin) and tvt.is_patched(model)


def test_trainer_callback(tmp_path):
    """One line in the Trainer: PatchCallback patches the model it holds, and two steps train as stock's do."""
    pytest.importorskip("accelerate")  # the Trainer's own dependency
    from transformers import Trainer, TrainingArguments
    stock, model = build("llama")
    rows = [{k: v[i] for k, v in batch("llama", seed=s).items()} for s in range(2) for i in range(2)]
    losses = {}
    for name, m, callbacks in (("stock", stock, []), ("patched", model, [tvt.PatchCallback()])):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=m, args=args, train_dataset=rows, callbacks=callbacks)
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert tvt.is_patched(model) and callbacks[0].report.loss == "fused"
    assert len(losses["patched"]) == 2
    torch.testing.assert_close(losses["patched"], losses["stock"], rtol=0, atol=5e-6)
    assert max_difference(model, stock) < 5e-5  # AdamW, as in the training test


def test_a_bfloat16_model_gets_the_stock_float32_loss():
    """A bfloat16 model without autocast: the stock loss is the float32 loss of its bfloat16 logits
    (ForCausalLMLoss upcasts them), and so is the fused one, unrounded (not a bfloat16 value widened)."""
    stock, twin = build("llama", torch.bfloat16)
    # the same hidden states and logits, bit for bit (rope in bfloat16 rounds once, not after each product)
    tvt.patch(twin, norms=False, mlp=False, attention=False, rope=False)
    inputs = batch("llama")
    stock.train()
    twin.train()
    expected, loss = stock(**inputs).loss, twin(**inputs).loss
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=0)  # a bfloat16 loss would be 1/256 apart


ROTARY = [name for name in FAMILIES if FAMILIES[name][2].get("rope")]


def build_rotary(family):
    """build(family), or "phi3_partial": Phi3 rotating half of each head (partial_rotary_factor=0.5, the part of
    transformers' partial-rotary apply_rotary_pos_emb that passes the rest of the head through)."""
    if family != "phi3_partial":
        return build(family)
    torch.manual_seed(0)
    stock = Phi3ForCausalLM(Phi3Config(**DECODER, partial_rotary_factor=0.5))
    twin = Phi3ForCausalLM(stock.config)
    twin.load_state_dict(stock.state_dict())
    return stock, twin


def rope_ops_run(model, inputs):
    """Whether a forward and backward of `model` ran torch_vjp's rope kernels (the profiler's op names)."""
    from torch.profiler import profile
    with profile() as prof:
        model(**inputs).loss.backward()
    names = {event.name for event in prof.events()}
    return "torch_vjp::rope" in names and "torch_vjp::rope_backward" in names


@pytest.mark.parametrize("family", [*ROTARY, "phi3_partial"])
def test_rope_alone_equals_stock_bitwise_in_float32_and_unpatches(family):
    """patch(model, rope=True) with nothing else: every attention module's apply_rotary_pos_emb is torch_vjp.rope
    (the profiler sees its kernels), and since rope rounds each product and sum as torch's formula does in float32,
    the loss, the logits and every gradient equal stock's bit for bit. The stock model in the same process runs
    no torch_vjp op; unpatch gives back the class's forward."""
    stock, model = build_rotary(family)
    report = tvt.patch(model, norms=False, mlp=False, attention=False, loss=None, rope=True)
    assert report.counts == dict(rope=2) and not [r for r in report.not_patched if r[0] == "rope"], str(report)
    inputs = batch("llama")
    assert rope_ops_run(model, inputs) and not rope_ops_run(stock, inputs) and untouched(stock)
    model.train(), stock.train()
    for m in (model, stock):
        m.zero_grad()
    out, stock_out = model(**inputs), stock(**inputs)
    out.loss.backward(), stock_out.loss.backward()
    assert torch.equal(out.logits, stock_out.logits) and torch.equal(out.loss, stock_out.loss)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), stock.parameters()))
    tvt.unpatch(model)
    assert untouched(model) and not rope_ops_run(model, inputs)


def test_rope_patch_reports_what_it_cannot_take():
    """An attention class whose modeling file's apply_rotary_pos_emb is another form (here GLM's interleaved
    one) is reported with the reason and left stock."""
    from transformers import GlmConfig, GlmForCausalLM
    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(**DECODER, head_dim=16))
    report = tvt.patch(model, norms=False, mlp=False, attention=False, loss=None)
    assert "rope" not in report.counts
    reasons = [reason for kind, _, reason in report.not_patched if kind == "rope"]
    assert len(reasons) == 2 and all("not transformers' rotate-half form" in r for r in reasons), str(report)


# ---------------------------------------------------------------------------------------------------------
# LoRA adapters. These tests take the mechanism PEFT relies on alone (peft's own layers are tested below):
# an adapter wrapper replaces an nn.Linear inside a module (setattr on its parent), and the parent's forward must
# call the new child. patch() binds forwards that read self.<child> at call time and captures no submodule, so an
# adapter put in after patch() (or before) is the one that runs. LoraLinear below is a minimal LoRA layer written
# for the test (the base layer frozen, y = base(x) + B(A(x)) · alpha / r), not peft's.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "qkv_proj")


class LoraLinear(torch.nn.Module):
    def __init__(self, base, r=4, alpha=8, seed=0):
        super().__init__()
        self.base_layer = base
        generator = torch.Generator().manual_seed(seed)
        self.lora_A = torch.nn.Parameter(torch.randn(r, base.in_features, generator=generator) / base.in_features ** 0.5)
        # B is not zero (peft starts it at zero) so that the adapter changes the output from the first step
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, r, generator=generator) * 0.02)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling


def add_lora(model, targets=LORA_TARGETS):
    """Every nn.Linear named in `targets` wrapped in a LoraLinear (seeded by its position), every other parameter
    frozen, as a LoRA fine-tune has it. Returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is torch.nn.Linear:
                setattr(module, child_name, LoraLinear(child, seed=len(wrapped)))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2", "qwen3_moe"])
def test_lora_adapters_train_through_the_patched_model(family, order):
    """A LoRA fine-tune of a patched model trains as the same fine-tune of the stock model: losses over AdamW steps to
    fp32 round-off and the adapters' parameters within 5e-5 (the standard of the training test), with the adapters
    in the patched MLPs and attention projections, whether they are put in after patch() or before it. The patched
    model still runs torch_vjp's kernels, the adapters get gradients (they are the ones that run), and unpatch keeps
    the adapters."""
    stock, model = build(family)
    if order == "patch_then_lora":
        report = tvt.patch(model)
        wrapped = add_lora(model)
    else:
        wrapped = add_lora(model)
        report = tvt.patch(model)
    assert add_lora(stock) == wrapped and len(wrapped) >= 8
    assert report.counts == FAMILIES[family][2], str(report)
    inputs = batch(family)
    names = ("rms_norm", "add_rms_norm", "rope")
    assert ops_run(model, inputs, *names) and not ops_run(stock, inputs, "rms_norm")
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model(**inputs).loss.backward()
    assert len(trainable) == 2 * len(wrapped) and all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable)
    model.zero_grad()
    losses, stock_losses = train(model, inputs), train(stock, inputs)
    torch.testing.assert_close(losses, stock_losses, rtol=0, atol=5e-6)
    assert max_difference(model, stock) < 5e-5
    tvt.unpatch(model)
    model.eval(), stock.eval()
    with torch.no_grad():
        assert isinstance(model.get_submodule(wrapped[0]), LoraLinear)
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_lora_on_the_output_head_takes_the_logits_path():
    """An adapter on the output head (peft's modules_to_save or a lm_head target) is not an nn.Linear: put in after
    patch(), the fused forward sees a head it did not patch and computes logits and the loss from them; put in
    before, patch() reports why the fused loss is not used. Both train as stock does."""
    for order in ("after", "before"):
        stock, model = build("llama")
        if order == "before":
            add_lora(model, targets=("lm_head", "q_proj"))
            report = tvt.patch(model)
            assert report.loss == "ce" and any(kind == "loss" and "not an nn.Linear" in reason
                                               for kind, _, reason in report.not_patched), str(report)
        else:
            assert tvt.patch(model).loss == "fused"
            add_lora(model, targets=("lm_head", "q_proj"))
        add_lora(stock, targets=("lm_head", "q_proj"))
        inputs = batch("llama")
        model.train()
        assert model(**inputs).logits is not None  # the logits path, which the adapter on the head takes part in
        torch.testing.assert_close(train(model, inputs), train(stock, inputs), rtol=0, atol=5e-6)
        assert max_difference(model, stock) < 5e-5


# ---------------------------------------------------------------------------------------------------------
# PEFT. The same LoRA fine-tunes with peft's own LoraConfig/get_peft_model (its default initialisation: lora_B
# zero, so the adapted model starts as the base model), the PeftModel given to patch() or get_peft_model given
# a patched model. peft is optional, like transformers: these tests skip without it (CI installs it).

# family -> the loss patch() gives it (Gemma2 too: its final-logit softcapping goes into the fused loss)
PEFT_FAMILIES = {"llama": "fused", "qwen3": "fused", "phi3": "fused", "gemma2": "fused", "qwen3_moe": "fused"}


def peft_lora(model, **options):
    """`model` with peft's LoRA adapters (r=4, alpha=8; by default on every linear layer but the output head, and
    for an MoE model on its experts' and router's weights, as peft's "all-linear" does), drawn from one seed: two
    models of the same weights get the same adapters."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    return peft.get_peft_model(model, peft.LoraConfig(**{**dict(r=4, lora_alpha=8, target_modules="all-linear"),
                                                         **options}))


def adapters(model):
    """The trainable (adapter) parameters by name, copied."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def frozen(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_peft_lora_trains_through_the_patched_model(family, order):
    """A peft LoRA fine-tune of a patched model trains as the same fine-tune of the stock model: losses over AdamW
    steps to fp32 round-off, every parameter within 5e-5 (the training test's standard), with the fused loss while
    it trains with labels (Gemma2's with its softcap). patch() takes the PeftModel (it patches the model inside) or
    get_peft_model takes the patched model. The adapters train (each gets a gradient and moves); the frozen base
    parameters keep their bits. unpatch() leaves the adapters in and a stock model."""
    pytest.importorskip("peft")
    stock, model = build(family)
    if order == "patch_then_peft":
        report = tvt.patch(model)
        peft_model = peft_lora(model)
    else:
        peft_model = peft_lora(model)
        report = tvt.patch(peft_model)
    reference = peft_lora(stock)
    assert tvt.is_patched(peft_model) and tvt.patch(peft_model) is report and not tvt.is_patched(reference)
    assert report.counts == FAMILIES[family][2] and report.loss == PEFT_FAMILIES[family], str(report)
    start, base = adapters(peft_model), frozen(peft_model)
    assert start.keys() == adapters(reference).keys() and all(
        torch.equal(start[k], v) for k, v in adapters(reference).items())
    assert len(start) >= 8 and all(("lora_A" in k) != ("lora_B" in k) for k in start)
    assert all(not v.any() for k, v in start.items() if "lora_B" in k)  # peft's initialisation: the base model
    if family == "qwen3_moe":  # peft adapts the experts' weights (and the router's) as parameters
        assert any(".mlp.experts.lora_A." in k for k in start) and any(".mlp.gate.lora_A." in k for k in start)

    inputs = batch(family)
    assert ops_run(peft_model, inputs, "rms_norm", "add_rms_norm", "rope", "geglu" if family == "gemma2" else "swiglu")
    assert not ops_run(reference, inputs, "rms_norm")
    peft_model.train()
    assert (peft_model(**inputs).logits is None) == (report.loss == "fused")  # the fused loss forms no logits
    peft_model.zero_grad()
    losses, stock_losses = train(peft_model, inputs), train(reference, inputs)
    torch.testing.assert_close(losses, stock_losses, rtol=0, atol=5e-6)
    assert max_difference(peft_model, reference) < 5e-5
    # The last step's gradients: every adapter got one (lora_B moved off zero, so lora_A's are nonzero too).
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0 and not torch.equal(p, start[name]), name
        else:
            assert p.grad is None and torch.equal(p, base[name]), name

    tvt.unpatch(peft_model)
    assert untouched(peft_model) and not tvt.is_patched(peft_model) and adapters(peft_model).keys() == start.keys()
    assert not ops_run(peft_model, inputs, "rms_norm")
    peft_model.eval(), reference.eval()
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_peft_adapter_saves_loads_into_a_stock_model_and_merges(family, tmp_path):
    """After a LoRA fine-tune of a patched model: save_pretrained writes the adapter alone, which a stock model
    loads (PeftModel.from_pretrained) to the same bits and the same outputs and greedy tokens; merge_and_unload()
    folds the adapters into the patched model (the same weights, bit for bit, as the stock model's merge), which
    stays patched: the same logits as before merging, the fused loss equal to the stock merged model's."""
    peft = pytest.importorskip("peft")
    stock, model = build(family)
    tvt.patch(model)
    peft_model = peft_lora(model)
    inputs = batch(family)
    train(peft_model, inputs)
    trained = adapters(peft_model)

    peft_model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / "model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(stock, tmp_path).eval()  # stock: the initial weights
    assert untouched(loaded) and not tvt.is_patched(loaded)
    loaded_adapters = {k: p.detach() for k, p in loaded.named_parameters() if "lora_" in k}
    assert loaded_adapters.keys() == trained.keys() and all(torch.equal(trained[k], v) for k, v in
                                                            loaded_adapters.items())
    peft_model.eval()
    plain = {k: v for k, v in batch(family, seed=2).items() if k != "labels"}
    with torch.no_grad():
        logits = peft_model(**plain).logits
        torch.testing.assert_close(logits, loaded(**plain).logits, rtol=1e-5, atol=1e-5)
    kwargs = dict(input_ids=plain["input_ids"][:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(peft_model.generate(**kwargs), loaded.generate(**kwargs))

    merged, stock_merged = peft_model.merge_and_unload(), loaded.merge_and_unload()
    assert merged is model and tvt.is_patched(merged) and not any("lora_" in k for k in merged.state_dict())
    assert merged.state_dict().keys() == stock_merged.state_dict().keys() and all(
        torch.equal(v, stock_merged.state_dict()[k]) for k, v in merged.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(merged(**plain).logits, logits, rtol=1e-5, atol=1e-5)
        merged.train(), stock_merged.train()
        output = merged(**inputs)
        assert output.logits is None  # the fused loss
        torch.testing.assert_close(output.loss, stock_merged(**inputs).loss, rtol=0, atol=5e-6)
    tvt.unpatch(merged)
    assert untouched(merged)


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_peft_modules_to_save_copies_train_and_unpatch(order):
    """peft's modules_to_save trains a deep copy of each named module in place of it (here the output head, the
    final norm and each layer's attention, beside LoRA on the MLPs). Given the PeftModel, patch() patches the copies
    as well and reports that the head is peft's wrapper, not an nn.Linear (the logits path); given to
    get_peft_model, a patched model's copies are patched ones (their forwards bound to the copies, the attention's
    config a copy of the private one) and the wrapped head takes the logits path. Either trains as stock; the copies
    train, their originals keep their bits; unpatch() restores the copies too, and after merge_and_unload (which
    puts the copies into the model) as well."""
    pytest.importorskip("peft")
    stock, model = build("llama")
    options = dict(modules_to_save=["lm_head", "norm", "self_attn"])
    if order == "patch_then_peft":
        report = tvt.patch(model)
        peft_model = peft_lora(model, **options)
        assert report.loss == "fused"
    else:
        peft_model = peft_lora(model, **options)
        report = tvt.patch(peft_model)
        counts = dict(FAMILIES["llama"][2], loss=1, norms=6, attention=4, rope=4)  # and the copies
        assert report.loss == "ce" and report.counts == counts, str(report)
        assert any(kind == "loss" and "peft.utils.other.ModulesToSaveWrapper, not an nn.Linear" in reason
                   for kind, _, reason in report.not_patched), str(report)
    reference = peft_lora(stock, **options)
    head, norm = model.lm_head.modules_to_save["default"], model.model.norm.modules_to_save["default"]
    attention = [layer.self_attn.modules_to_save["default"] for layer in model.model.layers]
    # the copies run torch_vjp, bound to themselves (patch() leaves a head it does not fuse alone)
    assert all(m.__dict__["forward"].__self__ is m for m in [norm, *attention])
    assert all(m.config._attn_implementation == "torch_vjp" for m in attention)
    assert (head.__dict__["forward"].__self__ is head) if order == "patch_then_peft" else "forward" not in head.__dict__
    originals = {k: v.detach().clone() for k, v in model.state_dict().items() if "original_module" in k}
    assert len(originals) == 2 + 4 * 2  # lm_head, norm, and q, k, v, o of two layers

    inputs = batch("llama")
    assert ops_run(peft_model, inputs, "rms_norm", "softmax", "rope")  # only the copies of attention and norm run
    peft_model.train()
    assert peft_model(**inputs).logits is not None  # the logits path: the head is peft's wrapper
    losses, stock_losses = train(peft_model, inputs), train(reference, inputs)
    torch.testing.assert_close(losses, stock_losses, rtol=0, atol=5e-6)
    assert max_difference(peft_model, reference) < 5e-5
    assert all(p.requires_grad and p.grad.abs().max() > 0 for m in (head, norm, *attention) for p in m.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in originals.items())

    def stock_again(m):
        return untouched(m) and all(module.config._attn_implementation != "torch_vjp" for module in m.modules()
                                    if "config" in module.__dict__) and not any(
            ops_run(m, inputs, op) for op in ("rms_norm", "softmax", "rope"))

    tvt.unpatch(peft_model)
    assert stock_again(peft_model)
    tvt.patch(peft_model)
    merged = peft_model.merge_and_unload()  # the trained copies take their originals' places
    assert model.lm_head is head and model.model.norm is norm and model.model.layers[1].self_attn is attention[1]
    tvt.unpatch(merged)
    assert stock_again(merged)


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_peft_lora_on_the_output_head_takes_the_logits_path(order):
    """A peft LoRA layer on the output head: given the PeftModel, patch() reports that the head is peft's layer,
    not an nn.Linear, and takes the logits path; given to get_peft_model, the patched model's fused forward sees a
    head it did not patch and computes the logits (through the adapter) and the loss from them. Both train as stock."""
    pytest.importorskip("peft")
    stock, model = build("llama")
    options = dict(target_modules=["q_proj", "lm_head"])
    if order == "patch_then_peft":
        assert tvt.patch(model).loss == "fused"
        peft_model = peft_lora(model, **options)
    else:
        peft_model = peft_lora(model, **options)
        report = tvt.patch(peft_model)
        assert report.loss == "ce" and any(kind == "loss" and "peft.tuners.lora.layer.Linear, not an nn.Linear" in
                                           reason for kind, _, reason in report.not_patched), str(report)
    reference = peft_lora(stock, **options)
    assert any("lm_head.lora_A" in name for name in adapters(peft_model))
    inputs = batch("llama")
    peft_model.train()
    assert peft_model(**inputs).logits is not None
    torch.testing.assert_close(train(peft_model, inputs), train(reference, inputs), rtol=0, atol=5e-6)
    assert max_difference(peft_model, reference) < 5e-5
    assert model.lm_head.lora_B["default"].weight.abs().max() > 0  # the head's adapter trained


def test_peft_model_in_the_trainer_with_patch_callback(tmp_path):
    """The usual LoRA recipe: a PeftModel in the Trainer with activation checkpointing, PatchCallback in the
    callbacks. The callback patches the model inside the PeftModel (the fused loss), checkpointing recomputes the
    patched layers, and two steps train as stock's do."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    import dataclasses

    from transformers import Trainer, TrainingArguments
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    recompute = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    stock, model = build("llama")
    rows = [{k: v[i] for k, v in batch("llama", seed=s).items()} for s in range(2) for i in range(2)]
    losses, calls = {}, {}
    for name, m, callbacks in (("stock", peft_lora(stock), []), ("patched", peft_lora(model), [tvt.PatchCallback()])):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0, **{recompute: True})
        trainer = Trainer(model=m, args=args, train_dataset=rows, callbacks=callbacks)
        norm = m.get_base_model().model.layers[0].input_layernorm
        calls[name] = []
        hook = norm.register_forward_hook(lambda *_, calls=calls[name]: calls.append(1))
        trainer.train()
        hook.remove()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert tvt.is_patched(m) and callbacks[0].report.loss == "fused" and "forward" in norm.__dict__
    assert len(calls["patched"]) == len(calls["stock"]) == 4  # 2 steps, each layer run again in the backward
    assert len(losses["patched"]) == 2
    torch.testing.assert_close(losses["patched"], losses["stock"], rtol=0, atol=5e-6)
    assert max_difference(m, stock) < 5e-5  # stock holds the stock run's adapters; AdamW, as in the training test
