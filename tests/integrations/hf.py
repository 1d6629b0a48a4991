"""Tiny random-init Hugging Face setups and their whole-batch reference step.

Nothing is downloaded: models come from configs, token ids are drawn directly,
sequences are right-padded to a common length with labels -100 on the padding.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
import transformers
from torch.nn import functional as F

VOCAB, LENGTH = 40, 12

MODELS = ("gpt2", "bert", "llama")


def build_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=LENGTH,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif name == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=LENGTH,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertForSequenceClassification(config)
    elif name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=LENGTH,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(name)
    return model.to(dtype)


def build_data(name: str, n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` right-padded sequences of 2..LENGTH tokens, each with its index."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(n):
        size = int(torch.randint(2, LENGTH + 1, (), generator=generator))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:size] = torch.randint(3, VOCAB, (size,), generator=generator)
        mask = (torch.arange(LENGTH) < size).long()
        row = {"idx": index, "input_ids": ids, "attention_mask": mask}
        if name == "bert":
            row["labels"] = torch.randint(0, 3, (), generator=generator)
        else:
            row["labels"] = torch.where(mask.bool(), ids, -100)
        rows.append(row)
    return rows


@dataclass
class Collator:
    """Stacks the rows and remembers which ones each micro-batch held."""

    seen: list[list[int]] = field(default_factory=list)

    def __call__(self, features):
        self.seen.append([int(f["idx"]) for f in features])
        return {k: torch.stack([f[k] for f in features]) for k in features[0] if k != "idx"}


def stack(data, ids):
    rows = [data[i] for i in ids]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "idx"}


def reference_loss(name, model, batch, smoothing=0.0):
    """The whole batch's loss, written out: mean over predicted tokens, or over samples."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if name == "bert":
        return F.cross_entropy(logits, batch["labels"], label_smoothing=smoothing)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        label_smoothing=smoothing,
    )


def reference_grad(name, model, batch, smoothing=0.0) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    reference_loss(name, model, batch, smoothing).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return grad


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


class StepRecorder(transformers.TrainerCallback):
    """Every parameter before each optimizer step's window and after its step."""

    def __init__(self, model):
        self.model = model
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.logs: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.before.append(flat(self.model))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after.append(flat(self.model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def training_args(folder: str, **overrides) -> transformers.TrainingArguments:
    """SGD with lr 1 and no decay: each step's update is minus its gradient."""
    options = dict(
        output_dir=folder,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        num_train_epochs=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        warmup_steps=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def run(trainer_cls, name, n, dtype=torch.float32, *, trainer_kwargs=None, model_hook=None, **args):
    """Train ``trainer_cls`` for one epoch on ``n`` rows; per optimizer step, the window's
    row ids, the parameters before, after, and the whole-batch reference gradient."""
    model = build_model(name, dtype)
    if model_hook is not None:
        model_hook(model)
    data = build_data(name, n)
    collator = Collator()
    recorder = StepRecorder(model)
    with tempfile.TemporaryDirectory() as folder:
        trainer = trainer_cls(
            model=model,
            args=training_args(folder, **args),
            train_dataset=data,
            data_collator=collator,
            callbacks=[recorder],
            **(trainer_kwargs or {}),
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.train()
    return trainer, data, collator.seen, recorder


def step_errors(name, dtype, data, windows, recorder, smoothing=0.0):
    """Relative error of each step's update against minus the exact whole-batch gradient."""
    errors = []
    model = build_model(name, dtype)
    for before, after, ids in zip(recorder.before, recorder.after, windows, strict=True):
        torch.nn.utils.vector_to_parameters(before, model.parameters())
        g = reference_grad(name, model, stack(data, ids), smoothing)
        update = after - before
        errors.append(float((update + g).norm() / g.norm()))
    return errors


def windows_of(seen: list[list[int]], accumulation: int, steps_in_epoch: int) -> list[list[int]]:
    """The row ids of each optimizer step's window (one process)."""
    out, current = [], []
    for step, ids in enumerate(seen):
        current += ids
        if (step + 1) % accumulation == 0 or step + 1 == steps_in_epoch:
            out.append(current)
            current = []
    return out
