"""torch_vjp inside Hugging Face ``transformers`` models, one instance at a time.

``patch(model)`` swaps torch_vjp's fused ops into one model instance in place and returns a report of what it
replaced; ``unpatch(model)`` restores it. The process-wide classes are never touched, so a stock model in the
same process runs stock. What is swapped:

- norms: Llama-style ``*RMSNorm`` (float32 normalise, cast, then scale: ``rms_norm``'s ``casting_mode="llama"``),
  Gemma's ``*RMSNorm`` (scale by ``1 + weight`` in float32, cast after: ``offset=1.0``), ``nn.LayerNorm`` and
  ``nn.RMSNorm``; each with the eager module's casting rule, so results are the eager module's (bit for bit on
  the CPU for the RMSNorms); and in decoder layers a residual add and the norm after it as one ``add_rms_norm``
  (report kind ``"residual_norms"``): Llama's layer (the same code in Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma),
  Mixtral's and Phi3's (after its residual dropout), their first add and ``post_attention_layernorm``; Gemma2's
  and Gemma3's, the add after ``post_attention_layernorm`` and ``pre_feedforward_layernorm`` (1 + weight);
- mlp: gated MLPs (``gate_proj``/``up_proj`` or a fused ``gate_up_proj``) through ``swiglu``/``geglu``, the
  gate of MoE experts run by transformers' grouped/batched experts implementations, and GELU/SiLU activation
  modules through ``gelu``/``silu``;
- attention: eager attention with ``torch_vjp.softmax`` (scores in float32, as transformers' eager), registered
  with ``AttentionInterface`` and its mask function with ``ALL_MASK_ATTENTION_FUNCTIONS`` as ``"torch_vjp"``;
- rope: the attention modules' ``apply_rotary_pos_emb`` (transformers' rotate-half form, Llama's, or Phi3's with
  partial rotary dims) through ``torch_vjp.rope``, q and k in one call;
- loss: the causal-LM loss through ``fused_linear_cross_entropy`` on the model's own forward when it trains
  with labels (no full logits; Gemma2's final-logit softcapping, and Gemma3's where set, as its ``softcap``), or
  ``cross_entropy`` on the logits; the masked-LM loss through ``cross_entropy``.

Every swap is an instance attribute (a bound ``forward``, ``_apply_gate`` or ``loss_function``; for rope, the
attention class's own forward code bound with globals in which ``apply_rotary_pos_emb`` is torch_vjp's), so the
state_dict, parameter identity, ``isinstance`` and ``type(module)`` are those of the stock model.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel, TrainerCallback
    from transformers.generation import GenerationMixin
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.utils.generic import ModelOutput
except ImportError as error:  # the optional dependency: pip install torch_vjp[transformers]
    raise ImportError("torch_vjp.transformers needs the transformers package (pip install 'torch_vjp[transformers]')"
                      ) from error

import torch_vjp

__all__ = ["ATTENTION", "PatchCallback", "PatchReport", "is_patched", "patch", "patch_trainer", "unpatch"]

# The name under which the attention function and its mask function are registered with transformers.
ATTENTION = "torch_vjp"
_STATE = "_torch_vjp_patch"  # the instance attribute that holds a patched model's record
_LOSSES = ("fused", "ce", None)


@dataclass
class PatchReport:
    """What ``patch`` did to one model.

    ``replaced`` maps each kind (``"norms"``, ``"mlp"``, ``"activations"``, ``"attention"``, ``"rope"``,
    ``"loss"``) to the
    qualified names of the modules it now runs through torch_vjp (``""`` is the model itself).
    ``not_patched`` lists ``(kind, module name, reason)`` for what was left stock. ``attention`` is the
    attention implementation the model now runs, ``loss`` ``"fused"``, ``"ce"`` or None.
    """
    model: str
    replaced: dict = field(default_factory=dict)
    not_patched: list = field(default_factory=list)
    attention: Optional[str] = None
    loss: Optional[str] = None

    @property
    def counts(self) -> dict:
        order = ("norms", "residual_norms", "mlp", "activations", "attention", "rope", "loss")
        return {kind: len(self.replaced[kind]) for kind in order if kind in self.replaced}

    def _add(self, kind: str, name: str) -> None:
        self.replaced.setdefault(kind, []).append(name)

    def _skip(self, kind: str, name: str, reason: str) -> None:
        self.not_patched.append((kind, name, reason))

    def __str__(self) -> str:
        done = ", ".join(f"{kind} {count}" for kind, count in self.counts.items()) or "nothing"
        lines = [f"torch_vjp.transformers.patch({self.model}): replaced {done}; attention={self.attention!r}, "
                 f"loss={self.loss!r}"]
        lines += [f"  not patched ({kind}) {name or '<model>'}: {reason}" for kind, name, reason in self.not_patched]
        return "\n".join(lines)


@dataclass
class _Record:
    """How to undo a patch: each instance attribute set, with what the instance held before."""
    options: dict
    report: PatchReport
    attributes: list = field(default_factory=list)  # (module, attribute, had_before, value_before)
    configs: list = field(default_factory=list)  # (module, original config)
    config_pairs: list = field(default_factory=list)  # (original config, private copy)


def _set(record: _Record, module: nn.Module, attribute: str, value) -> None:
    had = attribute in module.__dict__
    record.attributes.append((module, attribute, had, module.__dict__.get(attribute)))
    object.__setattr__(module, attribute, value)  # plain instance attribute, never a registered submodule


# ---------------------------------------------------------------------------------------------------------
# Recognising modules. A module is patched when its forward is, instruction for instruction, the forward of
# the reference class in transformers (many model files copy Llama's norm and MLP): its class is not named.

def _code_equal(a, b) -> bool:
    if a.co_code != b.co_code or a.co_names != b.co_names or len(a.co_consts) != len(b.co_consts):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _code_equal(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def _same_code(f, g) -> bool:
    f, g = inspect.unwrap(f), inspect.unwrap(g)
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return a is not None and b is not None and _code_equal(a, b)


@functools.lru_cache(maxsize=None)
def _references() -> dict:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm
    from transformers.models.llama import modeling_llama
    from transformers.models.olmo import modeling_olmo
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3MLP
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer
    return {"llama_norm": LlamaRMSNorm.forward, "gemma_norm": GemmaRMSNorm.forward, "gemma_norm_": GemmaRMSNorm._norm,
            "mlp": LlamaMLP.forward, "fused_mlp": Phi3MLP.forward,
            # decoder layers whose residual add + the next norm become one add_rms_norm (_DECODERS)
            "decoder": LlamaDecoderLayer.forward, "decoder_mixtral": MixtralDecoderLayer.forward,
            "decoder_phi3": Phi3DecoderLayer.forward, "decoder_sandwich": Gemma2DecoderLayer.forward,
            # apply_rotary_pos_emb: Llama's (whole head dim), Phi3's (partial rotary: the rest passes through)
            "rope": (modeling_llama.apply_rotary_pos_emb, modeling_phi3.apply_rotary_pos_emb),
            "rope_cast": modeling_olmo.apply_rotary_pos_emb,  # OLMo's: the outputs cast back to q's and k's dtypes
            "rotate_half": modeling_llama.rotate_half}


def _has_parameter(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Parameter)


def _norm_kind(module: nn.Module) -> Optional[str]:
    cls, ref = type(module), _references()
    if cls.forward is nn.LayerNorm.forward:
        return "layer_norm"
    if hasattr(nn, "RMSNorm") and cls.forward is nn.RMSNorm.forward:
        return "torch_rms_norm"
    if _same_code(cls.forward, ref["llama_norm"]) and _has_parameter(module, "weight"):
        return "llama_rms_norm"
    if (_same_code(cls.forward, ref["gemma_norm"]) and _same_code(getattr(cls, "_norm", None), ref["gemma_norm_"])
            and _has_parameter(module, "weight")):
        return "gemma_rms_norm"
    return None


def _activation_kind(act) -> Optional[str]:
    """'silu', or gelu's `approximate` ('none', 'tanh'), for activation modules torch_vjp computes exactly so."""
    from transformers import activations
    if not isinstance(act, nn.Module) or "forward" in act.__dict__:
        return None
    cls = type(act)
    if cls in (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU)):
        return "silu"
    if cls is nn.GELU:
        return act.approximate
    if cls is getattr(activations, "GELUActivation", None):  # erf GELU (C or Python form)
        return "none"
    if cls in (getattr(activations, "GELUTanh", None), getattr(activations, "NewGELUActivation", None)):
        return "tanh"
    return None


def _mlp_kind(module: nn.Module) -> Optional[str]:
    ref, cls = _references(), type(module)
    if _same_code(cls.forward, ref["mlp"]) and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "mlp"
    if _same_code(cls.forward, ref["fused_mlp"]) and hasattr(module, "gate_up_proj"):
        return "fused_mlp"
    return None


def _calls(function, name: str) -> bool:
    """Whether `function`'s own code names `name` (a global or an attribute)."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return code is not None and name in code.co_names


# ---------------------------------------------------------------------------------------------------------
# The forwards bound to patched instances. They read all they need from `self`, so a deep copy of a patched
# model (a reference model, an EMA copy) runs its own parameters.

_NATIVE = (torch.float32, torch.bfloat16, torch.float16)  # dtypes the eager norms compute in float32 from


def _llama_rms_norm_forward(self, hidden_states):
    # The eager module normalises in float32, rounds to the input dtype, then scales by the weight (in the
    # weight's and the input's promoted dtype): rms_norm's casting_mode="llama". float64 input is normalised in
    # float32 by the eager module, then scaled in float64.
    if hidden_states.dtype in _NATIVE:
        return torch_vjp.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon,
                                  casting_mode="llama")
    y = torch_vjp.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), None, self.variance_epsilon)
    return self.weight * y.to(hidden_states.dtype)


def _gemma_rms_norm_forward(self, x):
    # Gemma scales by 1 + weight in float32 and casts after: rms_norm's offset=1.0 (the kernel adds 1 to the
    # float32 weight, as `1.0 + weight.float()`, and rounds once). float64 input is computed in float32 too.
    if x.dtype in _NATIVE:
        return torch_vjp.rms_norm(x, (x.shape[-1],), self.weight, self.eps, offset=1.0, casting_mode="gemma")
    y = torch_vjp.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps, offset=1.0)
    return y.type_as(x)


def _layer_norm_forward(self, input):
    return torch_vjp.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def _torch_rms_norm_forward(self, input):
    return torch_vjp.rms_norm(input, self.normalized_shape, self.weight, self.eps)


def _decoder_forward(self, *args, **kwargs):
    # The decoder layer's forward with a residual add and the norm after it as one add_rms_norm: the body for
    # this layer's pattern is `self._torch_vjp_layer` (a plain function, set by patch()).
    # transformers 5 checkpoints a layer in its class's `forward` (GradientCheckpointingLayer wraps it), which an
    # instance forward replaces: the same here, caching off as there (older versions checkpoint in __call__,
    # around this forward).
    from transformers.modeling_layers import GradientCheckpointingLayer
    body = self._torch_vjp_layer
    if "past_key_values" in kwargs:  # the name transformers still accepts for `cache` (deprecate_kwarg)
        kwargs["cache"] = kwargs.pop("past_key_values")
    if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
            and "__call__" not in GradientCheckpointingLayer.__dict__):
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not self._can_checkpoint_with_cache:
            for name in ("cache", "past_key_values", "layer_past"):
                if kwargs.get(name) is not None:
                    kwargs[name] = None
        return self._gradient_checkpointing_func(functools.partial(body, self, **kwargs), *args)
    return body(self, *args, **kwargs)


def _add_norm(layer, norm: nn.Module, x, residual):
    """(norm(residual + x), residual + x) by one add_rms_norm, the sum rounded as the eager add, the norm the
    module's own casting rule (Llama's, or Gemma's 1 + weight in float32); the eager add and module elsewhere."""
    if x.dtype in _NATIVE and residual.dtype == x.dtype and residual.shape == x.shape:
        shape = (x.shape[-1],)
        if layer._torch_vjp_residual == "gemma_rms_norm":
            return torch_vjp.add_rms_norm(x, residual, shape, norm.weight, norm.eps, offset=1.0, casting_mode="gemma")
        return torch_vjp.add_rms_norm(x, residual, shape, norm.weight, norm.variance_epsilon, casting_mode="llama")
    s = residual + x
    return norm(s), s


def _llama_decoder_layer(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                         position_embeddings=None, **kwargs):
    # LlamaDecoderLayer.forward (Mistral's, Qwen2's, Qwen3's, Qwen3-MoE's, Gemma's, OLMo's: the same code) with its
    # first residual add and post_attention_layernorm as one add_rms_norm (s = residual + attention output,
    # rounded as the eager add, then the norm of s): the same bits, one pass over the two inputs, and the
    # gradient of s added in the norm's VJP pass.
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states, residual = _add_norm(self, self.post_attention_layernorm, hidden_states, residual)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _mixtral_decoder_layer(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                           cache=None, **kwargs):
    # MixtralDecoderLayer.forward: Llama's body, its arguments in another order and no use_cache of its own
    # (one passed in stays in kwargs, as there).
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                      attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs)
    hidden_states, residual = _add_norm(self, self.post_attention_layernorm, hidden_states, residual)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _phi3_decoder_layer(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                        position_embeddings=None, **kwargs):
    # Phi3DecoderLayer.forward: Llama's, with dropout modules on the attention and MLP outputs before each residual
    # add. The dropout module runs as stock (the same random mask from the same generator state), then its output
    # and the residual go through add_rms_norm.
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states, residual = _add_norm(self, self.post_attention_layernorm, self.resid_attn_dropout(hidden_states),
                                        residual)
    hidden_states = self.mlp(hidden_states)
    return residual + self.resid_mlp_dropout(hidden_states)


def _sandwich_decoder_layer(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                            cache=None, **kwargs):
    # Gemma2DecoderLayer.forward (Gemma3's: the same code): the attention output normed by post_attention_layernorm,
    # added to the residual, and the sum normed by pre_feedforward_layernorm: that add and pre_feedforward_layernorm
    # as one add_rms_norm (Gemma's 1 + weight). The MLP output's post_feedforward_layernorm and the last add stay.
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                      attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs)
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states, residual = _add_norm(self, self.pre_feedforward_layernorm, hidden_states, residual)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.post_feedforward_layernorm(hidden_states)
    return residual + hidden_states


# reference forward (in _references()) -> (the body that replaces it, the norm after the residual add it fuses)
_DECODERS = {"decoder": (_llama_decoder_layer, "post_attention_layernorm"),
             "decoder_mixtral": (_mixtral_decoder_layer, "post_attention_layernorm"),
             "decoder_phi3": (_phi3_decoder_layer, "post_attention_layernorm"),
             "decoder_sandwich": (_sandwich_decoder_layer, "pre_feedforward_layernorm")}


def _decoder_kind(module: nn.Module) -> Optional[str]:
    forward = type(module).forward
    return next((kind for kind in _DECODERS if _same_code(forward, _references()[kind])), None)


def _gate(kind: str, gate, up):
    if kind == "silu":
        return torch_vjp.swiglu(gate, up)
    return torch_vjp.geglu(gate, up, approximate=kind)


def _mlp_forward(self, x):
    return self.down_proj(_gate(self._torch_vjp_act, self.gate_proj(x), self.up_proj(x)))


def _fused_mlp_forward(self, hidden_states):
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(_gate(self._torch_vjp_act, gate, up))


def _experts_apply_gate(self, gate_up_out):
    # transformers' grouped_mm and batched_mm experts call this on the concatenated [gate; up] projection.
    gate, up = gate_up_out.chunk(2, dim=-1)
    return _gate(self._torch_vjp_act, gate, up)


def _activation_forward(self, input):
    if self._torch_vjp_act == "silu":
        return torch_vjp.silu(input)
    return torch_vjp.gelu(input, approximate=self._torch_vjp_act)


def _head_forward(self, input):
    # Under a fused-loss forward the head hands its input (the hidden states) on to the loss: no logits.
    if self._torch_vjp_pass_hidden:
        return input
    return type(self).forward(self, input)


def _plain_function(f):
    """The Python function behind `f`: itself, or the function a wrapper module holds (with the `kernels` package
    installed, transformers' apply_rotary_pos_emb is a hub-kernel module wrapping the function)."""
    if isinstance(f, types.FunctionType):
        return f
    forward = getattr(type(f), "forward", None)
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, types.FunctionType) and value.__name__ == getattr(f, "__name__", value.__name__):
            return value
    return None


def _rebound(f, names: dict):
    """A copy of function `f` whose global `names` are replaced; through decorators made with functools.wraps
    (transformers' deprecate_kwarg, the kernels package's forward wrapper), by copying each wrapper with its
    wrapped function replaced in its closure. None where a wrapper does not hold what it wraps in its closure."""
    inner = f.__dict__.get("__wrapped__")
    if inner is None:
        copy_ = types.FunctionType(f.__code__, dict(f.__globals__, **names), f.__name__, f.__defaults__, f.__closure__)
    else:
        cells = f.__closure__ or ()
        at = []
        for i, cell in enumerate(cells):
            try:
                if cell.cell_contents is inner:
                    at.append(i)
            except ValueError:  # an empty cell
                pass
        new_inner = _rebound(inner, names) if len(at) == 1 else None
        if new_inner is None:
            return None
        closure = tuple(types.CellType(new_inner) if i == at[0] else c for i, c in enumerate(cells))
        copy_ = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, closure)
    copy_.__kwdefaults__ = f.__kwdefaults__
    copy_.__dict__.update(f.__dict__)
    if inner is not None:
        copy_.__wrapped__ = new_inner
    copy_.__qualname__ = f.__qualname__
    return copy_


def _rope_forward(cls) -> tuple:
    """(cls.forward rebound so that its apply_rotary_pos_emb is torch_vjp.rope, None) for an attention class whose
    forward calls its modeling file's apply_rotary_pos_emb, that function and rotate_half being transformers'
    rotate-half forms; else (None, the reason)."""
    stock = inspect.unwrap(cls.forward).__globals__.get("apply_rotary_pos_emb")
    function = _plain_function(stock)
    ref = _references()
    casts = function is not None and _same_code(function, _plain_function(ref["rope_cast"]))
    if function is None or not (casts or any(_same_code(function, _plain_function(r)) for r in ref["rope"])) or \
            not _same_code(function.__globals__.get("rotate_half"), ref["rotate_half"]):
        return None, f"{cls.__module__}.apply_rotary_pos_emb is not transformers' rotate-half form"
    patched = _rebound(cls.forward, {"apply_rotary_pos_emb": _apply_rotary_pos_emb_cast if casts else
                                     _apply_rotary_pos_emb})
    if patched is None:
        return None, f"{cls.__name__}.forward is wrapped by a decorator that does not hold it in its closure"
    return patched, None


def _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (and Phi3's partial-rotary one) by torch_vjp.rope."""
    return torch_vjp.rope(q, k, cos, sin, unsqueeze_dim)


def _apply_rotary_pos_emb_cast(q, k, cos, sin, unsqueeze_dim=1):
    """OLMo's apply_rotary_pos_emb (outputs cast back to q's and k's dtypes) by torch_vjp.rope."""
    q_embed, k_embed = torch_vjp.rope(q, k, cos, sin, unsqueeze_dim)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def _patch_rope(model: PreTrainedModel, record: _Record, report: PatchReport) -> None:
    forwards: dict = {}  # per attention class, its forward bound to torch_vjp's rope (made once)
    for name, module in model.named_modules():
        if not _calls(type(module).forward, "apply_rotary_pos_emb"):
            continue
        if "forward" in module.__dict__:
            report._skip("rope", name, "its forward is already replaced on the instance")
            continue
        cls = type(module)
        if cls not in forwards:
            forwards[cls] = _rope_forward(cls)
        forward, reason = forwards[cls]
        if forward is None:
            report._skip("rope", name, reason)
            continue
        _set(record, module, "forward", types.MethodType(forward, module))
        report._add("rope", name)


# ---------------------------------------------------------------------------------------------------------
# Attention

def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' eager attention (grouped keys and values, optional tanh softcapping, additive mask) with the
    softmax of the float32 scores by ``torch_vjp.softmax``. Registered as ``"torch_vjp"``."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("torch_vjp attention has no attention sinks; patch(model, attention=False) keeps "
                                  "the model's own attention")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # each key/value head serves `groups` query heads
        b, h, s, d = key.shape
        key = key[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)
        value = value[:, :, None].expand(b, h, groups, s, value.shape[-1]).reshape(b, h * groups, s, value.shape[-1])
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch_vjp.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _register_attention() -> None:
    # Once per process, by name; a model runs it only where its own config names it.
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, attention_forward)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        # Without a registered mask function transformers builds no mask at all for the name, silently.
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


def _own_config(model: PreTrainedModel, record: _Record) -> None:
    """Give the model private copies of its configs: the attention implementation lives in the config, which
    models built from one config object share."""
    memo: dict = {}  # each original config's id -> its copy, sub-configs included
    copy.deepcopy(model.config, memo)
    seen = set()
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PreTrainedConfig) and id(config) in memo:
            record.configs.append((module, config))
            if id(config) not in seen:
                seen.add(id(config))
                record.config_pairs.append((config, memo[id(config)]))
            object.__setattr__(module, "config", memo[id(config)])


def _attention_modules(model: nn.Module) -> list:
    return [(name, m) for name, m in model.named_modules() if _calls(type(m).forward, "ALL_ATTENTION_FUNCTIONS")]


# ---------------------------------------------------------------------------------------------------------
# Loss

def _causal_lm_loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                    **kwargs):
    """transformers' ForCausalLMLoss through torch_vjp: labels shifted left (or `shift_labels`), `ignore_index`,
    and with `num_items_in_batch` the sum divided by it (gradient accumulation). Under a fused forward `logits`
    are the hidden states and the head's weight is applied inside the fused loss, with the model's final-logit
    softcap (the head's `_torch_vjp_softcap`, set for that call by the fused forward) as its `softcap`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    head = self.get_output_embeddings()
    if getattr(head, "_torch_vjp_pass_hidden", False):
        hidden = logits.reshape(-1, logits.shape[-1])
        softcap = getattr(head, "_torch_vjp_softcap", None)
        if hidden.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(hidden.device.type):
            # The stock loss is the float32 loss of the half-precision logits, unrounded: the fused loss gives
            # that value under autocast of the model's own dtype (which casts nothing here). A softcap is applied
            # in float32 there, where stock's rounds each of its three steps to the half type.
            with torch.autocast(hidden.device.type, dtype=hidden.dtype):
                loss = _fused_loss(hidden, head, shift_labels, ignore_index, reduction, softcap)
        else:
            loss = _fused_loss(hidden, head, shift_labels, ignore_index, reduction, softcap).float()
    else:
        loss = torch_vjp.cross_entropy(logits.float().reshape(-1, vocab_size), shift_labels, ignore_index=ignore_index,
                                       reduction=reduction)
    return _per_item(loss, num_items_in_batch)


def _fused_loss(hidden, head, labels, ignore_index, reduction, softcap=None):
    return torch_vjp.fused_linear_cross_entropy(hidden, head.weight, labels, head.bias, ignore_index=ignore_index,
                                                reduction=reduction, softcap=softcap)


def _per_item(loss, num_items_in_batch):
    """transformers' gradient-accumulation rule: a sum divided by the items of the whole batch, when given."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _masked_lm_loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """transformers' ForMaskedLMLoss through torch_vjp.cross_entropy."""
    labels = labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch_vjp.cross_entropy(logits.float().reshape(-1, vocab_size), labels, ignore_index=ignore_index,
                                   reduction=reduction)
    return _per_item(loss, num_items_in_batch)


def _without_logits(output):
    if isinstance(output, ModelOutput):
        return type(output)(**{k: v for k, v in output.items() if k != "logits"})
    return (output[0],) + tuple(output[2:])  # return_dict=False: (loss, logits, ...)


def _fusable_softcap(value) -> bool:
    """Whether `value` is a final-logit softcap the fused loss takes as its `softcap`: a positive finite number."""
    # (comparisons, not math.isfinite: under torch.compile a changed value is traced as a symbolic float)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _vocab_sharded(weight) -> bool:
    """A DTensor head sharded by vocabulary rows (tensor parallel), which the fused loss takes without a softcap."""
    if type(weight).__name__ != "DTensor":
        return False
    from torch_vjp import distributed
    return distributed.is_vocab_sharded(weight)


@functools.lru_cache(maxsize=None)
def _fused_forward(original, softcap_block=None):
    """The model's own forward, run so that the head's input goes to the fused loss when it trains with labels.
    `return_logits=True` asks for the logits (and the loss from them) instead.

    `softcap_block` (from _logits_to_loss): None where the forward has no final-logit softcapping block; "fused"
    where it is Gemma2's (`logits = c * tanh(logits / c)`, c = `self.config.final_logit_softcapping`): with c set,
    the model's block is turned off for this call only (the config value set to None around the forward and
    restored after it, also when it raises) and c goes to the fused loss as its `softcap`; "off" where another
    form of it was accepted because it was off: should the config set it later, the call takes the logits path.
    """
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, return_logits=False, **kwargs):
        labels = kwargs.get("labels")
        if args and labels is None:
            labels = signature.bind_partial(self, *args, **kwargs).arguments.get("labels")
        head = self.get_output_embeddings()
        # A head swapped in after patch() (resize_token_embeddings) computes logits: take the plain path.
        ours = getattr(head.__dict__.get("forward"), "__func__", None) is _head_forward
        if labels is None or return_logits or not self.training or not ours:
            return original(self, *args, **kwargs)
        config = self.config
        softcap = getattr(config, "final_logit_softcapping", None) if softcap_block is not None else None
        if softcap is not None and not (softcap_block == "fused" and _fusable_softcap(softcap)
                                        and not _vocab_sharded(head.weight)):
            return original(self, *args, **kwargs)  # a softcap the fused loss does not take: the model's own
        head._torch_vjp_pass_hidden = True
        try:
            head._torch_vjp_softcap = softcap
            if softcap is not None:
                config.final_logit_softcapping = None  # the model's block would softcap the hidden states
            output = original(self, *args, **kwargs)
        finally:
            head._torch_vjp_pass_hidden = False
            head._torch_vjp_softcap = None
            if softcap is not None:
                config.final_logit_softcapping = softcap
        return _without_logits(output)

    return forward


@functools.lru_cache(maxsize=None)
def _masked_lm_forward(original):
    """For masked-LM models that build torch.nn.CrossEntropyLoss inside their forward (BERT, RoBERTa): the forward
    runs without labels and the loss (a mean over the unignored tokens, as theirs) comes from torch_vjp."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        labels = bound.arguments.pop("labels", None)
        output = original(*bound.args, **bound.kwargs)
        if labels is None:
            return output
        logits = output["logits"] if isinstance(output, ModelOutput) else output[0]
        loss = torch_vjp.cross_entropy(logits.reshape(-1, self.config.vocab_size), labels.reshape(-1).to(logits.device))
        if isinstance(output, ModelOutput):
            return type(output)(loss=loss, **dict(output.items()))
        return (loss,) + tuple(output)

    return forward


# Gemma2's final-logit softcapping (Gemma3's, VaultGemma's, ...: the same code), which the fused loss computes
# as its `softcap`: these lines, stripped, and nothing else in the block.
_SOFTCAP_BLOCK = ("if self.config.final_logit_softcapping is not None:",
                  "logits = logits / self.config.final_logit_softcapping",
                  "logits = torch.tanh(logits)",
                  "logits = logits * self.config.final_logit_softcapping")


def _config_softcap(config):
    """The final-logit softcap a model's config sets (its own, or its text config's), or None."""
    value = getattr(config, "final_logit_softcapping", None)
    if value is None and hasattr(config, "get_text_config"):
        try:
            value = getattr(config.get_text_config(), "final_logit_softcapping", None)
        except Exception:  # a config without a text config of its own
            value = None
    return value


def _logits_to_loss(model: PreTrainedModel, head_name: str) -> tuple:
    """(None, softcap_block) when the model's forward hands `self.<head>(...)` to `self.loss_function` unchanged
    but for a final-logit softcapping block, else (why not, None). softcap_block: "fused" for Gemma2's block
    (_SOFTCAP_BLOCK), which the fused loss takes over; "off" for another form of it, allowed where the config
    turns it off; None where there is none."""
    try:
        lines = inspect.getsource(inspect.unwrap(type(model).forward)).splitlines()
    except (OSError, TypeError):
        return "the forward's source is not available", None
    start = next((i for i, line in enumerate(lines) if f"self.{head_name}(" in line), None)
    if start is None or not lines[start].strip().startswith("logits = "):
        return f"the forward does not compute `logits = self.{head_name}(...)`", None
    end = next((i for i in range(start + 1, len(lines)) if "self.loss_function(" in lines[i]), None)
    if end is None:
        return "the forward does not call self.loss_function", None
    block = None
    i = start + 1
    while i < end:
        text = lines[i].strip()
        if text.startswith("if ") and "final_logit_softcapping" in text:
            indent = len(lines[i]) - len(lines[i].lstrip())
            j = i + 1
            while j < end and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                j += 1
            body = tuple(line.strip() for line in lines[i:j] if line.strip())
            if body == _SOFTCAP_BLOCK:
                value = getattr(model.config, "final_logit_softcapping", None)
                if value is not None and not _fusable_softcap(value):
                    return f"final_logit_softcapping is {value!r}, not a positive finite number", None
                block = "fused"
            elif _config_softcap(model.config) is None:
                block = block or "off"
            else:
                return ("final_logit_softcapping is set, and the forward softcaps in a form the fused loss does not "
                        f"take ({' / '.join(body[1:])!r})"), None
            i = j
            continue
        if "logits" in text.replace("final_logit_softcapping", "") and not text.startswith("#"):
            if "softcapping" in text or "softcap" in lines[i - 1]:
                return "final_logit_softcapping is set, outside a block the fused loss takes", None
            return f"the logits are changed between the head and the loss ({text!r})", None
        i += 1
    return None, block


def _patch_loss(model: PreTrainedModel, mode: str, record: _Record, report: PatchReport) -> None:
    forward = type(model).forward
    loss_type = getattr(model, "loss_type", None)
    uses_loss_function = _calls(forward, "loss_function")
    # transformers takes the causal-LM loss for a loss_type it does not know (GPT2LMHeadModel has none).
    causal = loss_type in ("ForCausalLM", "ForConditionalGeneration") or loss_type not in LOSS_MAPPING
    if uses_loss_function and causal and isinstance(model, GenerationMixin):
        if mode == "fused":
            head = model.get_output_embeddings()
            head_name = next((n for n, m in model.named_modules() if m is head), None)
            if not (type(head) is nn.Linear and "forward" not in head.__dict__):
                # qualified: PEFT's LoRA layer is also named Linear
                reason = f"the output head is {type(head).__module__}.{type(head).__qualname__}, not an nn.Linear"
            elif "forward" in model.__dict__:  # e.g. an accelerate hook, which must stay outermost
                reason = "the model's forward is already replaced on the instance"
            else:
                reason, softcap_block = _logits_to_loss(model, head_name.rsplit(".", 1)[-1])
            if reason is None:
                _set(record, head, "_torch_vjp_pass_hidden", False)
                _set(record, head, "_torch_vjp_softcap", None)
                _set(record, head, "forward", types.MethodType(_head_forward, head))
                _set(record, model, "forward", types.MethodType(_fused_forward(forward, softcap_block), model))
            else:
                report._skip("loss", "", f"fused loss not used ({reason}): logits + torch_vjp.cross_entropy")
                mode = "ce"
        _set(record, model, "_loss_function", types.MethodType(_causal_lm_loss, model))
        report.loss = mode
        report._add("loss", "")
    elif uses_loss_function and loss_type == "ForMaskedLM":
        _set(record, model, "_loss_function", types.MethodType(_masked_lm_loss, model))
        report.loss = "ce"
        report._add("loss", "")
    elif (type(model).__name__.endswith("ForMaskedLM") and _calls(forward, "CrossEntropyLoss")
          and "forward" not in model.__dict__):
        _set(record, model, "forward", types.MethodType(_masked_lm_forward(forward), model))
        report.loss = "ce"
        report._add("loss", "")
    else:
        report._skip("loss", "", f"{type(model).__name__} computes no causal- or masked-LM loss torch_vjp replaces")


# ---------------------------------------------------------------------------------------------------------
# patch / unpatch

def _unwrap(model):
    """The transformers model inside a PEFT model or a DistributedDataParallel/compiled wrapper."""
    for _ in range(4):
        if isinstance(model, PreTrainedModel):
            return model
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    return model


def is_patched(model) -> bool:
    return _STATE in _unwrap(model).__dict__


def patch(model, *, norms: bool = True, mlp: bool = True, attention: bool = True, rope: bool = True,
          loss: Optional[str] = "fused") -> PatchReport:
    r"""Swap torch_vjp's fused ops into one transformers model instance, in place.

    Modules are found by what their forward computes (the same code as transformers' Llama, Gemma and Phi3
    modules, ``nn.LayerNorm``, the GELU/SiLU activation classes) and by the config, never by the model's class,
    and each is patched on the instance: a stock model in the same process runs stock. Parameters, buffers,
    the state_dict, ``isinstance`` and ``type()`` are unchanged.

    Args:
        model: a ``transformers.PreTrainedModel`` (or a PEFT, DDP or compiled wrapper of one).
        norms: RMSNorm (Llama and Gemma forms), ``nn.LayerNorm``, ``nn.RMSNorm``; in decoder layers whose forward
            is Llama's, Mixtral's, Phi3's or Gemma2's (Gemma3's) code, a residual add and the RMSNorm after it
            through ``add_rms_norm`` (Llama's or Gemma's casting rule, as that norm's).
        mlp: gated MLPs through ``swiglu``/``geglu`` (by the activation module: SiLU, tanh or erf GELU), the
            gate of MoE experts under transformers' ``grouped_mm``/``batched_mm`` experts implementations, and
            other GELU/SiLU activation modules through ``gelu``/``silu``.
        attention: run attention as eager attention with ``torch_vjp.softmax``, registered with transformers
            as ``"torch_vjp"`` (with its mask function). The model gets a private copy of its config, where
            transformers keeps the attention implementation, so models that shared the config are unaffected.
        rope: the rotary embedding of q and k by ``torch_vjp.rope``, in attention modules whose forward calls
            their modeling file's ``apply_rotary_pos_emb`` when that is transformers' rotate-half function
            (Llama's, Phi3's with partial rotary dims, OLMo's with its casts): the instance gets its class's forward code bound to
            globals where that name is torch_vjp's. Other forms (interleaved, decorated forwards) are reported.
        loss: ``"fused"``: when the model trains (``model.training``) with ``labels``, the causal-LM loss
            through ``fused_linear_cross_entropy`` on the head's input, never forming the logits, and the output
            carries no logits (pass ``return_logits=True`` to the forward for them). Final-logit softcapping
            written as Gemma2's (Gemma3's) block goes into the fused loss as its ``softcap``: the model's block
            is turned off for that call (its config's ``final_logit_softcapping`` None during the forward,
            restored after it, also when it raises), so eval mode, ``return_logits``, ``generate()`` and
            :func:`unpatch` see the model's own softcapping. Otherwise, and where the model changes its logits
            before the loss in another way, ``"ce"``, with the reason in the report. ``"ce"``: the
            logits as usual, the loss by ``torch_vjp.cross_entropy``. Masked-LM heads always take ``"ce"``.
            Both honour ``num_items_in_batch``, ``ignore_index`` and ``shift_labels`` as transformers does.
            None leaves the loss alone.

    Returns:
        a :class:`PatchReport`. Patching a patched model with the same options returns its report.
    """
    if loss not in _LOSSES:
        raise ValueError(f"patch(): loss must be one of {_LOSSES}, got {loss!r}")
    model = _unwrap(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch(): expected a transformers PreTrainedModel, got {type(model).__name__}")
    options = dict(norms=norms, mlp=mlp, attention=attention, rope=rope, loss=loss)
    record = model.__dict__.get(_STATE)
    if record is not None:
        if record.options != options:
            raise RuntimeError(f"patch(): {type(model).__name__} is already patched with {record.options}; "
                               "unpatch(model) first")
        return record.report

    report = PatchReport(model=type(model).__name__)
    record = _Record(options=options, report=report)
    owned_activations = set()  # act_fn modules a patched MLP no longer calls

    for name, module in model.named_modules():
        if module is model:
            continue
        replaced_forward = "forward" in module.__dict__
        kind = _norm_kind(module) if norms else None
        if kind is not None:
            if replaced_forward:
                report._skip("norms", name, "its forward is already replaced on the instance")
                continue
            forward = {"layer_norm": _layer_norm_forward, "torch_rms_norm": _torch_rms_norm_forward,
                       "llama_rms_norm": _llama_rms_norm_forward, "gemma_rms_norm": _gemma_rms_norm_forward}[kind]
            _set(record, module, "forward", types.MethodType(forward, module))
            report._add("norms", name)
            continue
        layer = _decoder_kind(module) if norms else None
        if layer is not None:
            body, norm_name = _DECODERS[layer]
            norm = getattr(module, norm_name, None)
            norm_kind = _norm_kind(norm) if isinstance(norm, nn.Module) else None
            if replaced_forward:
                report._skip("residual_norms", name, "its forward is already replaced on the instance")
            elif norm_kind not in ("llama_rms_norm", "gemma_rms_norm") or "forward" in norm.__dict__:
                report._skip("residual_norms", name, f"its {norm_name} is not a Llama or Gemma RMSNorm torch_vjp "
                                                     "patches")
            else:  # the residual add and the norm after it as one add_rms_norm
                _set(record, module, "_torch_vjp_layer", body)
                _set(record, module, "_torch_vjp_residual", norm_kind)
                _set(record, module, "forward", types.MethodType(_decoder_forward, module))
                report._add("residual_norms", name)
            continue
        if norms and "Norm" in type(module).__name__ and not list(module.children()):
            report._skip("norms", name, f"{type(module).__name__}'s forward is none of the norms torch_vjp reproduces")
            continue
        if not mlp:
            continue
        kind = _mlp_kind(module)
        if kind is not None:
            act = module.act_fn if kind == "mlp" else module.activation_fn
            act_kind = _activation_kind(act)
            if replaced_forward:
                report._skip("mlp", name, "its forward is already replaced on the instance")
            elif act_kind is None:
                report._skip("mlp", name, f"activation {type(act).__name__} has no fused gated op")
            else:
                _set(record, module, "_torch_vjp_act", act_kind)
                _set(record, module, "forward", types.MethodType(
                    _mlp_forward if kind == "mlp" else _fused_mlp_forward, module))
                owned_activations.add(id(act))
                report._add("mlp", name)
            continue
        if hasattr(type(module), "_apply_gate") and hasattr(module, "gate_up_proj"):
            _patch_experts(name, module, record, report, owned_activations)
            continue
        if type(module).__name__.endswith("MLP") and not hasattr(module, "c_fc") and not hasattr(module, "fc1"):
            report._skip("mlp", name, f"{type(module).__name__}'s forward is not a gated MLP torch_vjp reproduces")

    if mlp:  # activation modules left to run on their own (GPT-2's, BERT's, and those of unpatched MLPs)
        for name, module in model.named_modules():
            act_kind = _activation_kind(module)
            if act_kind is not None and id(module) not in owned_activations:
                _set(record, module, "_torch_vjp_act", act_kind)
                _set(record, module, "forward", types.MethodType(_activation_forward, module))
                report._add("activations", name)

    if attention:
        _patch_attention(model, record, report)
    if rope:
        _patch_rope(model, record, report)
    if loss is not None:
        _patch_loss(model, loss, record, report)
    object.__setattr__(model, _STATE, record)
    return report


def _patch_experts(name, module, record, report, owned_activations) -> None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        report._skip("mlp", name, "this transformers has no experts gate to replace")
        return
    act_kind = _activation_kind(getattr(module, "act_fn", None))
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if type(module)._apply_gate is not _default_apply_gate or not getattr(module, "has_gate", False):
        report._skip("mlp", name, f"{type(module).__name__} has its own gate")
    elif not getattr(module, "is_concatenated", True):
        report._skip("mlp", name, "the experts' gate and up projections are interleaved")
    elif act_kind is None:
        report._skip("mlp", name, f"activation {type(module.act_fn).__name__} has no fused gated op")
    elif implementation in (None, "eager"):
        report._skip("mlp", name, "the eager experts loop applies act_fn inline; the 'grouped_mm' and 'batched_mm' "
                                  "experts implementations are patched")
    else:
        _set(record, module, "_torch_vjp_act", act_kind)
        _set(record, module, "_apply_gate", types.MethodType(_experts_apply_gate, module))
        owned_activations.add(id(module.act_fn))
        report._add("mlp", name)


def _patch_attention(model: PreTrainedModel, record: _Record, report: PatchReport) -> None:
    modules = _attention_modules(model)
    if not modules or not model._can_set_attn_implementation():
        report._skip("attention", "", f"{type(model).__name__} does not dispatch attention through transformers' "
                                      "AttentionInterface")
        return
    if getattr(model.config, "output_attentions", False):
        report._skip("attention", "", "output_attentions needs transformers' eager attention")
        return
    _register_attention()
    _own_config(model, record)
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:
        report._skip("attention", "", f"transformers kept {model.config._attn_implementation!r}")
        return
    report.attention = ATTENTION
    privates = {id(private) for _, private in record.config_pairs}
    for name, module in modules:
        config = module.__dict__.get("config")
        if isinstance(config, PreTrainedConfig) and id(config) not in privates and \
                config._attn_implementation != ATTENTION:
            # A config of the module's own, not the model's, which set_attn_implementation does not reach (PEFT's
            # modules_to_save trains a deep copy of the module it names, config included): a private copy of it
            # that names torch_vjp.
            private = copy.deepcopy(config)
            private._attn_implementation = ATTENTION
            record.configs.append((module, config))
            record.config_pairs.append((config, private))
            object.__setattr__(module, "config", private)
        report._add("attention", name)


def unpatch(model) -> None:
    """Undo :func:`patch` on this model: every instance attribute it set is removed or given back its former
    value, and the model's own config objects are restored (changes made to the model's config while patched,
    other than the attention implementation, are carried over to them)."""
    model = _unwrap(model)
    record = model.__dict__.get(_STATE)
    if record is None:
        raise RuntimeError(f"unpatch(): {type(model).__name__} is not patched by torch_vjp.transformers")
    # What patch() set, to find it again on copies of patched modules (below).
    names = {attribute for _, attribute, had, _ in record.attributes if not had}
    functions = {getattr(module.__dict__.get(attribute), "__func__", None) for module, attribute, _, _ in
                 record.attributes} - {None}
    for module, attribute, had, value in reversed(record.attributes):
        if had:
            object.__setattr__(module, attribute, value)
        else:
            module.__dict__.pop(attribute, None)
    for original, private in record.config_pairs:
        for key, value in private.__dict__.items():
            if key in ("_attn_implementation_internal",) or isinstance(value, PreTrainedConfig):
                continue
            try:
                changed = key not in original.__dict__ or bool(original.__dict__[key] != value)
            except Exception:  # values that do not compare to a bool are left as they were
                changed = False
            if changed:
                setattr(original, key, value)
    for module, config in record.configs:
        object.__setattr__(module, "config", config)
    # A module deep-copied from a patched one while patched carries copies of its instance attributes, bound to
    # the copy, and of its private config: PEFT's modules_to_save trains such a copy (of lm_head, a norm, an
    # attention module) in place of the module, and merge_and_unload() puts it into the model. It is restored too.
    originals = {}
    for original, private in record.config_pairs:
        originals.setdefault(type(private), original)
    for module in model.modules():
        for attribute in names & module.__dict__.keys():
            value = module.__dict__[attribute]
            if attribute.startswith("_torch_vjp_") or getattr(value, "__func__", None) in functions:
                del module.__dict__[attribute]
        config = module.__dict__.get("config")
        if isinstance(config, PreTrainedConfig) and type(config) in originals and \
                config.__dict__.get("_attn_implementation_internal") == ATTENTION:
            _restore_attention(config, originals[type(config)])
    del model.__dict__[_STATE]


def _restore_attention(config, original) -> None:
    """`config`'s attention implementation (and its sub-configs') set back to `original`'s."""
    config._attn_implementation_internal = original.__dict__.get("_attn_implementation_internal")
    for key in getattr(config, "sub_configs", None) or {}:
        sub, original_sub = getattr(config, key, None), getattr(original, key, None)
        if isinstance(sub, PreTrainedConfig) and isinstance(original_sub, PreTrainedConfig):
            _restore_attention(sub, original_sub)


# ---------------------------------------------------------------------------------------------------------
# Trainer / TRL

class PatchCallback(TrainerCallback):
    """Patches the model a ``transformers.Trainer`` (or a TRL trainer) holds, once, before training:

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PatchCallback()])

    Keyword arguments are :func:`patch`'s options; the report is kept in ``callback.report``.
    """

    def __init__(self, **options):
        self.options = options
        self.report = None

    def _patch(self, model):
        if model is not None:
            self.report = patch(model, **self.options)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._patch(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._patch(model)  # a model swapped in after __init__ (model_init) is patched here; patch is idempotent


def patch_trainer(trainer, **options) -> PatchReport:
    """Patch the model ``trainer`` holds (see :func:`patch`); call before ``trainer.train()``."""
    return patch(trainer.model, **options)
