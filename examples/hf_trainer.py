"""Train a Hugging Face causal LM with torch_vjp's fused ops: one callback in the Trainer.

A tiny Llama built from a config and random token sequences stand in for a checkpoint and a data set, so this
runs anywhere in seconds with nothing downloaded; with a real model, `from_pretrained(...)` replaces the
first lines. Needs `pip install -e ".[transformers]"` (transformers and accelerate, the Trainer's dependency).

    python examples/hf_trainer.py
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import torch_vjp.transformers

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512))
sequences = torch.randint(0, 512, (16, 32))
data = [{"input_ids": ids, "labels": ids} for ids in sequences]

# PatchCallback patches the model the trainer holds (torch_vjp.transformers.patch), before the first step:
# RMSNorms, SwiGLU MLPs, attention softmax, and the fused linear cross-entropy (no full logits in training).
callback = torch_vjp.transformers.PatchCallback()
with tempfile.TemporaryDirectory() as output_dir:
    args = TrainingArguments(output_dir=output_dir, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

print(callback.report)
print("losses:", [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry])
# The same model, outside a Trainer: patch(model) / unpatch(model) (patch is idempotent).
torch_vjp.transformers.unpatch(model)
