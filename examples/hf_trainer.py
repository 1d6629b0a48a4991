"""Train a tiny GPT-2 with the Hugging Face Trainer, each step on the exact gradient.

The model is built from a config (random init, nothing downloaded) and trained on
padded sequences of 4-32 tokens with gradient accumulation. First the audit says
how far the stock Trainer's step would be from the exact one; then batchgrad's
Trainer trains, its logged loss the mean over every predicted token of each window.

    python examples/hf_trainer.py                              # one process, CPU
    torchrun --nproc_per_node=2 examples/hf_trainer.py         # DDP, two CPU processes
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from batchgrad.integrations.transformers import Trainer, audit


def dataset(rows: int, vocab: int, length: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(rows):
        size = int(torch.randint(4, length + 1, (), generator=generator))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:size] = torch.randint(3, vocab, (size,), generator=generator)
        mask = (torch.arange(length) < size).long()
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as folder:
        training = transformers.TrainingArguments(
            output_dir=folder,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=4,
            num_train_epochs=args.epochs,
            learning_rate=1e-3,
            logging_steps=1,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        data = dataset(args.rows, config.vocab_size, config.n_positions)
        stock = transformers.Trainer(model=model, args=training, train_dataset=data)
        print(audit(stock).summary())
        trainer = Trainer(model=model, args=training, train_dataset=data)  # the one change
        trainer.train()
        report = trainer.accumulate_report
        print(
            f"last step: loss {report.loss:.4f} over {report.count} tokens of "
            f"{report.world_size} process(es)"
        )


if __name__ == "__main__":
    main()
