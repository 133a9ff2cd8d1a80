"""Hugging Face ``transformers.Trainer``: ``SAMTrainer`` runs SAM's two passes over every
accumulated micro-batch, with bf16 autocast, the ``Trainer``'s LR schedule and gradient clipping.

Needs ``transformers`` and ``accelerate`` (``pip install 'samgria[integrations]'``).
"""

import importlib.util
import os
import tempfile
import unittest

if not all(importlib.util.find_spec(name) for name in ("transformers", "accelerate")):
    if not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
        raise unittest.SkipTest("needs transformers and accelerate: pip install 'samgria[integrations]'")

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from samgria import SAM
from samgria.integrations.transformers import SAMTrainer

# A two-layer BERT built from a config (nothing is downloaded), on a task it can learn: is the
# first token in the lower half of the vocabulary?
config = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=2,
)
torch.manual_seed(0)
model = BertForSequenceClassification(config)

generator = torch.Generator().manual_seed(1)
input_ids = torch.randint(0, 64, (128, 8), generator=generator)
examples = [{"input_ids": ids, "labels": int(ids[0] < 32)} for ids in input_ids]


def accuracy():
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return (logits.argmax(-1) == input_ids[:, 0].lt(32).long()).float().mean().item()


with tempfile.TemporaryDirectory() as output_dir:
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # both passes see both micro-batches of every step
        num_train_epochs=4,
        learning_rate=5e-3,  # the Trainer's AdamW, linear decay, max_grad_norm=1.0
        bf16=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    # transforms= wraps the optimizer the Trainer creates; or pass a samgria optimizer in
    # optimizers=(optimizer, None).
    trainer = SAMTrainer(model=model, args=args, train_dataset=examples, transforms=[SAM(rho=0.05)])
    before = accuracy()
    trainer.train()

print(f"accuracy {before:.2f} -> {accuracy():.2f} in {trainer.state.global_step} SAM steps")
assert trainer.state.global_step == 4 * 128 // 16
assert accuracy() > max(before, 0.9)
