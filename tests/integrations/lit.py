"""A tiny token model in Lightning, exact and stock, and a recorder of its steps."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import batchgrad as bg

VOCAB, LENGTH = 20, 10

try:
    import lightning.pytorch as pl

    from batchgrad.integrations.lightning import ExactAccumulation
except ImportError:  # the tests skip themselves
    pl = None


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


def build_net(dtype, seed=0):
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def build_data(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(n):
        size = int(torch.randint(2, LENGTH + 1, (), generator=generator))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:size] = torch.randint(1, VOCAB, (size,), generator=generator)
        labels = torch.where(torch.arange(LENGTH) < size, ids, -100)
        rows.append({"idx": torch.tensor(index), "input_ids": ids, "labels": labels})
    return rows


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def reference_grad(net, batch):
    """The whole batch's mean over predicted tokens, written out."""
    net.zero_grad(set_to_none=True)
    logits = net(batch["input_ids"])
    F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)
    ).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    return grad


def flat(module):
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


if pl is not None:

    class Exact(ExactAccumulation):
        accumulate_grad_batches = 4

        def __init__(self, dtype=torch.float32, clip=None):
            super().__init__()
            self.net = build_net(dtype)
            self.gradient_clip_val = clip

        def training_loss(self, batch):
            return bg.Loss.from_causal_lm(self.net(batch["input_ids"]), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    class Stock(pl.LightningModule):
        """Lightning's own accumulation: each batch's mean, divided by K by the Trainer."""

        def __init__(self, dtype=torch.float32):
            super().__init__()
            self.net = build_net(dtype)

        def training_step(self, batch, batch_idx):
            logits = self.net(batch["input_ids"])
            return F.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    class Recorder(pl.Callback):
        """Per optimizer step: the rows of its window, parameters before and after."""

        def __init__(self):
            self.steps = []  # (row ids, before, after)
            self.rows, self.before, self.step = [], None, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.before is None:
                self.before = flat(module)
            self.rows += batch["idx"].tolist()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step != self.step:
                self.step = trainer.global_step
                self.steps.append((self.rows, self.before, flat(module)))
                self.rows, self.before = [], None


def fit(module, n, *, accumulate=1, strategy="auto", devices=1, batch_size=4):
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    data = torch.utils.data.DataLoader(build_data(n), batch_size=batch_size, collate_fn=collate)
    trainer.fit(module, data)
    return trainer, recorder.steps


def step_errors(steps, n, dtype, clip=None):
    data = build_data(n)
    net = build_net(dtype)
    errors = []
    for rows, before, after in steps:
        torch.nn.utils.vector_to_parameters(before, net.parameters())
        g = reference_grad(net, collate([data[i] for i in rows]))
        if clip is not None:
            g = g * min(1.0, clip / (float(g.norm()) + 1e-6))
        errors.append(float((after - before + g).norm() / g.norm()))
    return errors
