"""Training-step time and peak memory of small Hugging Face models, stock against torch_vjp.transformers.patch().

`python -m benchmarks --model llama[,gemma2,...|all] [--vocab 32000] [--threads 1] [--rounds 7] [--no-compile]`:
per family, a model built from a config (nothing is downloaded), two layers at hidden 128 and the given
vocabulary, trained on batch 4 x 256 tokens (labels, so the loss runs). Four variants of one initial state:
stock and patched, each eager and under torch.compile (inductor). A step is forward, backward and zeroing the
gradients (no optimizer: it is the same on both sides). The steps of the four variants alternate, round by
round; on the CPU with one thread (the default) a step's time is the calling thread's CPU time, which other
work on a shared machine does not inflate as it does wall time (benchmarks/compile_policy.py: clock); the table gives each variant's median and the
ratios patched ÷ stock, eager and compiled, with the spread of the per-round ratios (the noise). Peak memory
is each variant's peak during one step beyond what was allocated before it (benchmarks/timing.py: peak_memory_bytes; the CPU's through the profiler).
"""
from __future__ import annotations

import copy
import os
import statistics
import time

import torch

from .compile_policy import clock
from .timing import environment, peak_memory_bytes

# family -> (model class, config class, config arguments beyond the shared sizes). Sliding windows shorter than
# the sequence exercise the sliding masks; Gemma2 softcaps attention scores and final logits.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 128}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 128}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"sliding_window": 128, "final_logit_softcapping": 30.0,
                                                      "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"sliding_window": 128,
                                                          "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", None),
    "bert": ("BertForMaskedLM", "BertConfig", None),
}
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 128, 256, 2, 4, 2, 32
BATCH, LENGTH = 4, 256
VARIANTS = ("stock eager", "patched eager", "stock compiled", "patched compiled")


def config(family: str, vocab: int):
    import transformers

    _, config_class, extra = FAMILIES[family]
    cls = getattr(transformers, config_class)
    if family == "gpt2":
        return cls(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=vocab, n_positions=LENGTH,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "bert":
        return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                   vocab_size=vocab, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    return cls(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=vocab, max_position_embeddings=LENGTH,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def batch(family: str, vocab: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (BATCH, LENGTH), generator=generator)
    labels = ids.clone()
    if family == "bert":  # masked-LM: a target at every third position (the rest ignored)
        labels[:, 1::3] = -100
        labels[:, 2::3] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def run_family(family: str, vocab: int, device: str, rounds: int, compile: bool) -> dict:
    import transformers

    import torch_vjp.transformers as tvt

    torch.manual_seed(0)
    stock = getattr(transformers, FAMILIES[family][0])(config(family, vocab)).to(device).train()
    patched = copy.deepcopy(stock)
    report = tvt.patch(patched)
    models = {"stock eager": stock, "patched eager": patched}
    if compile:
        models["stock compiled"] = torch.compile(copy.deepcopy(stock))
        models["patched compiled"] = torch.compile(copy.deepcopy(patched))
    inputs = batch(family, vocab, device)

    def step(model):
        loss = model(**inputs).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    losses = {name: float(step(model)) for name, model in models.items()}  # compile, warm
    for model in models.values():
        step(model)
    times, now = {name: [] for name in models}, clock(device)
    for _ in range(rounds):
        for name, model in models.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = now()
            step(model)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append((now() - start) * 1e3)
    peaks = {name: peak_memory_bytes(lambda m=model: step(m), device) for name, model in models.items()}
    row = {"family": family, "vocab": vocab, "patched": str(report.counts).replace(",", ";"),
           "loss_path": report.loss}
    for name in models:
        row[f"{name} ms"] = round(statistics.median(times[name]), 2)
        row[f"{name} loss"] = round(losses[name], 5)
        row[f"{name} peak MiB"] = None if peaks[name] is None else round(peaks[name] / 2**20, 1)
    for kind in ("eager", "compiled"):
        if f"stock {kind}" in times:
            per_round = [p / s for p, s in zip(times[f"patched {kind}"], times[f"stock {kind}"])]
            row[f"{kind} ratio"] = round(row[f"patched {kind} ms"] / row[f"stock {kind} ms"], 3)
            row[f"{kind} ratio spread"] = f"{min(per_round):.2f}-{max(per_round):.2f}"
    return row


def markdown(rows, command: str, env: dict, threads: int, timer: str) -> str:
    kinds = [k for k in ("eager", "compiled") if f"{k} ratio" in rows[0]]
    head = ["family", "vocab", *[f"{v} {unit}" for unit in ("ms", "peak MiB") for v in VARIANTS if f"{v} ms" in rows[0]],
            *[c for k in kinds for c in (f"{k} ratio", f"{k} ratio spread")], "loss_path"]
    lines = [f"# Training step, stock vs torch_vjp.transformers.patch() ({env['device']}, {threads} thread(s))", "",
             f"`{command}`, torch {env['torch']}, commit {env['commit']}, {env['date']}.", "",
             f"Batch {BATCH} x {LENGTH} tokens, {LAYERS} layers, hidden {HIDDEN}; forward + backward, median of "
             f"interleaved rounds ({timer}); ratio = patched ÷ stock (below 1: patched is faster), spread = the per-round "
             "ratios' range.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in head) + " |")
    return "\n".join(lines) + "\n"


def main(families: list[str], vocab: int, device: str, rounds: int, threads: int, compile: bool, out: str,
         command: str) -> list[dict]:
    import csv

    if device == "cpu":
        torch.set_num_threads(threads)
    names = list(FAMILIES) if families == ["all"] else families
    for name in names:
        if name not in FAMILIES:
            raise SystemExit(f"benchmarks: unknown model family {name!r}; families: {', '.join(FAMILIES)}, all")
    env = environment(device)
    rows = []
    for name in names:
        torch._dynamo.reset()
        row = run_family(name, vocab, device, rounds, compile)
        rows.append(row)
        print({k: v for k, v in row.items() if "ratio" in k or k == "family"}, flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "models.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list({k: None for row in rows for k in row}))
        writer.writeheader()
        writer.writerows(rows)
    timer = "thread CPU time" if clock(device) is time.thread_time else "wall time"
    text = markdown(rows, command, env, threads, timer)
    with open(os.path.join(out, "models.md"), "w") as f:
        f.write(text)
    print(text)
    return rows
