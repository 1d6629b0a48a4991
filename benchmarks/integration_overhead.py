"""What each trainer integration costs per optimizer step over the stock trainer.

Side by side in one run, on the same model, data and window of micro-batches:

- ``transformers``: ``transformers.Trainer`` vs ``batchgrad.integrations.transformers.Trainer``
  (GPT-2 from a config, padded rows, ``gradient_accumulation_steps``);
- ``lightning``: ``Trainer(accumulate_grad_batches=K)`` with automatic optimisation vs
  ``ExactAccumulation`` (a GRU token model, padded rows);
- ``accelerate``: ``with accelerator.accumulate(model)`` over the micro-batches vs
  ``bg.accumulate`` on the prepared model (the same GRU model).

Each round trains every side for ``--steps`` optimizer steps, the order rotating from
round to round; a step is timed from the start of its window to the end of its
optimizer step (callbacks for the trainers, ``time.perf_counter`` for accelerate),
and the first step of each run is dropped (warm-up). The ratio is the median step of
batchgrad's side over the stock one's, per round and over all rounds.

    python benchmarks/integration_overhead.py            # a few minutes on 2 cores
    python benchmarks/integration_overhead.py --quick    # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import (
    RESULTS,
    add_run_options,
    describe,
    environment,
    use_threads,
    write_results,
)
from torch import nn
from torch.nn import functional as F

import batchgrad as bg

VOCAB, LENGTH = 64, 48


def _rows(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        size = int(torch.randint(4, LENGTH + 1, (), generator=generator))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:size] = torch.randint(3, VOCAB, (size,), generator=generator)
        mask = (torch.arange(LENGTH) < size).long()
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return rows


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# -- transformers -------------------------------------------------------------------


def _hf_side(exact: bool, settings: dict[str, Any]) -> Callable[[], list[float]]:
    import transformers

    from batchgrad.integrations.transformers import Trainer

    class Clock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.start, self.steps = 0.0, list[float]()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps.append(time.perf_counter() - self.start)

    micro, k, steps = settings["micro_batch_size"], settings["accumulation"], settings["steps"]
    data = _rows(micro * k * steps)

    def run() -> list[float]:
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=LENGTH,
            n_embd=settings["width"],
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(config)
        clock = Clock()
        with tempfile.TemporaryDirectory() as folder:
            args = transformers.TrainingArguments(
                output_dir=folder,
                per_device_train_batch_size=micro,
                gradient_accumulation_steps=k,
                max_steps=steps,
                learning_rate=1e-3,
                use_cpu=True,
                report_to="none",
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
                data_seed=0,
            )
            cls = Trainer if exact else transformers.Trainer
            trainer = cls(model=model, args=args, train_dataset=data, callbacks=[clock])
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
            trainer.train()
        return clock.steps[1:]

    return run


def hf_window_direct(settings: dict[str, Any], budget: float) -> dict[str, Any]:
    """The window alone (every micro-batch's forward and backward, no optimizer step, no
    Trainer loop), both Trainers' own ``get_batch_samples`` and ``training_step`` called
    on the same window in interleaved rounds: far less noise than whole runs."""
    import transformers
    from common import interleaved

    from batchgrad.integrations.transformers import Trainer

    micro, k = settings["micro_batch_size"], settings["accumulation"]
    data = _rows(micro * k)
    window = [_collate(data[i * micro : (i + 1) * micro]) for i in range(k)]

    def make(cls: type[transformers.Trainer], folder: str) -> transformers.Trainer:
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=LENGTH,
            n_embd=settings["width"],
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        )
        args = transformers.TrainingArguments(
            output_dir=folder,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=k,
            use_cpu=True,
            report_to="none",
        )
        trainer = cls(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data)
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        return trainer

    def step(trainer: transformers.Trainer) -> Callable[[], None]:
        def run() -> None:
            samples, count = trainer.get_batch_samples(iter(window), k, trainer.args.device)
            for inputs in samples:
                trainer.training_step(trainer.model, inputs, count)
            trainer.model.zero_grad()

        return run

    with tempfile.TemporaryDirectory() as folder:
        stock, exact = make(transformers.Trainer, folder), make(Trainer, folder)
        a, b = interleaved(
            [step(stock), step(exact)], rounds=None, warmup=2, budget=budget, min_rounds=10
        )
    return {
        "stock": a.summary(),
        "batchgrad": b.summary(),
        "ratio": statistics.median(b.seconds) / statistics.median(a.seconds),
    }


# -- Lightning and accelerate: a GRU token model ----------------------------------------


class _TinyLM(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def _mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


def _bg_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> bg.Loss:
    return bg.Loss.from_causal_lm(model(batch["input_ids"]), batch["labels"])


def _lightning_side(exact: bool, settings: dict[str, Any]) -> Callable[[], list[float]]:
    import lightning.pytorch as pl

    from batchgrad.integrations.lightning import ExactAccumulation

    micro, k, steps = settings["micro_batch_size"], settings["accumulation"], settings["steps"]
    width = settings["width"]

    class Stock(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _TinyLM(width)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return _mean_loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Exact(ExactAccumulation):
        accumulate_grad_batches = k

        def __init__(self) -> None:
            super().__init__()
            self.net = _TinyLM(width)

        def training_loss(self, batch: Any) -> bg.Loss:
            return _bg_loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.step, self.steps = 0, list[float]()

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
            if self.start is None:
                self.start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: Any, module: Any, out: Any, batch: Any, i: int
        ) -> None:
            if trainer.global_step != self.step and self.start is not None:
                self.steps.append(time.perf_counter() - self.start)
                self.step, self.start = trainer.global_step, None

    data = _rows(micro * k * steps)

    def run() -> list[float]:
        torch.manual_seed(0)
        clock = Clock()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            accumulate_grad_batches=1 if exact else k,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
        )
        loader = torch.utils.data.DataLoader(data, batch_size=micro, collate_fn=_collate)
        trainer.fit(Exact() if exact else Stock(), loader)
        return clock.steps[1:]

    return run


def _accelerate_side(exact: bool, settings: dict[str, Any]) -> Callable[[], list[float]]:
    from accelerate import Accelerator

    micro, k, steps = settings["micro_batch_size"], settings["accumulation"], settings["steps"]
    data = _rows(micro * k * steps)

    def run() -> list[float]:
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
        net = _TinyLM(settings["width"])
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        size = micro * k if exact else micro
        loader = torch.utils.data.DataLoader(data, batch_size=size, collate_fn=_collate)
        model, optimizer, loader = accelerator.prepare(net, optimizer, loader)
        times: list[float] = []
        start = time.perf_counter()
        for index, batch in enumerate(loader):
            if exact:
                bg.accumulate(model, _bg_loss, batch, micro_batch_size=micro)
                optimizer.step()
                optimizer.zero_grad()
            else:
                with accelerator.accumulate(model):
                    accelerator.backward(_mean_loss(model, batch))
                    optimizer.step()
                    optimizer.zero_grad()
            if exact or (index + 1) % k == 0:
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
        return times[1:]

    return run


SIDES = {
    "transformers": _hf_side,
    "lightning": _lightning_side,
    "accelerate": _accelerate_side,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(
        parser, RESULTS / "integration_overhead.json", "1 round of 3 tiny steps per side"
    )
    parser.add_argument("--rounds", type=int, default=5, help="per integration (default: 5)")
    parser.add_argument("--steps", type=int, default=9, help="optimizer steps per run (default: 9)")
    parser.add_argument("--only", choices=sorted(SIDES), action="append", help="repeatable")
    parser.add_argument(
        "--budget", type=float, default=30.0, help="seconds for the direct window timing"
    )
    args = parser.parse_args(argv)
    use_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and deprecations
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    settings = {
        "micro_batch_size": 4 if args.quick else 8,
        "accumulation": 2 if args.quick else 4,
        "steps": 3 if args.quick else args.steps,
        "width": 16 if args.quick else 128,
        "rounds": 1 if args.quick else args.rounds,
        "quick": args.quick,
    }
    env = environment()
    print(describe(env, "integration step vs the stock trainer's"))
    rows = []
    for name in args.only or list(SIDES):
        stock, exact = SIDES[name](False, settings), SIDES[name](True, settings)
        stock_steps: list[float] = []
        exact_steps: list[float] = []
        per_round = []
        for index in range(settings["rounds"]):
            order = [(stock, stock_steps), (exact, exact_steps)]
            a: list[float] = []
            b: list[float] = []
            for run, into in order if index % 2 == 0 else order[::-1]:
                taken = run()
                into.extend(taken)
                (a if into is stock_steps else b).extend(taken)
            per_round.append(statistics.median(b) / statistics.median(a))
        ratio = statistics.median(exact_steps) / statistics.median(stock_steps)
        rows.append(
            {
                "integration": name,
                "stock_median_step_ms": 1e3 * statistics.median(stock_steps),
                "batchgrad_median_step_ms": 1e3 * statistics.median(exact_steps),
                "ratio": ratio,
                "ratio_per_round": per_round,
                "stock_steps_ms": [1e3 * t for t in stock_steps],
                "batchgrad_steps_ms": [1e3 * t for t in exact_steps],
            }
        )
        print(
            f"{name:13s} stock {rows[-1]['stock_median_step_ms']:8.1f} ms  batchgrad "
            f"{rows[-1]['batchgrad_median_step_ms']:8.1f} ms  ratio {ratio:.3f}  per round "
            + " ".join(f"{r:.3f}" for r in per_round),
            flush=True,
        )
    direct = None
    if args.only is None or "transformers" in args.only:
        direct = hf_window_direct(settings, 1.0 if args.quick else args.budget)
        print(
            f"transformers, the window alone (interleaved): stock "
            f"{direct['stock']['median_ms']:.1f} ms  batchgrad "
            f"{direct['batchgrad']['median_ms']:.1f} ms  ratio {direct['ratio']:.3f}"
        )
    write_results(
        args.out,
        {
            "benchmark": "integration_overhead",
            "environment": env,
            "settings": settings,
            "rows": rows,
            "transformers_window_direct": direct,
        },
    )
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
