"""Train a small token model with Lightning, each step on the exact window gradient.

Padded sequences of 2-24 tokens in batches of 8, 4 batches per optimizer step; the
loss is the mean over every predicted token of the window (the short last window
of an epoch by its own tokens), whatever the padding.

    python examples/lightning_train.py                         # one process, CPU
    python examples/lightning_train.py --devices 2             # DDP, two CPU processes
"""

import argparse

import lightning.pytorch as pl
import torch
from torch import nn

import batchgrad as bg
from batchgrad.integrations.lightning import ExactAccumulation

VOCAB, LENGTH = 32, 24


class Model(ExactAccumulation):
    accumulate_grad_batches = 4
    gradient_clip_val = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def training_loss(self, batch):
        ids, labels = batch
        return bg.Loss.from_causal_lm(self.head(self.rnn(self.embed(ids))[0]), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def dataset(rows: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, LENGTH + 1, (rows,), generator=generator)
    ids = torch.randint(1, VOCAB, (rows, LENGTH), generator=generator)
    mask = torch.arange(LENGTH) < sizes[:, None]
    return torch.utils.data.TensorDataset(ids * mask, ids.masked_fill(~mask, -100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Model()
    loader = torch.utils.data.DataLoader(dataset(args.rows), batch_size=8)
    trainer.fit(model, loader)
    report = model.accumulate_report
    if trainer.is_global_zero:
        print(
            f"last step: loss {report.loss:.4f} over {report.count} tokens, "
            f"{report.micro_batches} batch(es) per process, {report.world_size} process(es)"
        )


if __name__ == "__main__":
    main()
