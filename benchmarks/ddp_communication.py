"""Communication per logical batch under DDP: batchgrad vs the two usual loops.

    python benchmarks/ddp_communication.py            # ~1 minute on 2 CPU cores
    python benchmarks/ddp_communication.py --quick    # seconds: a smoke run

Two local gloo processes train an MLP (784-256-256-10); each holds 64 samples of
the logical batch, in 4 or 16 micro-batches. Timed side by side, interleaved, on
one DDP model without a communication hook (as most users run DDP):

- "sync every micro-batch": backward through DDP for every micro-batch;
- "no_sync loop": the hand-written recipe, every micro-batch but the last under
  ``no_sync()``;
- "batchgrad": ``bg.accumulate(ddp_model, ...)``, after its first call on the group
  (the agreement rides in the gradient all-reduce then).

The collectives and their bytes per logical batch are counted on the side: DDP's
buckets on a copy of the model with a counting communication hook, batchgrad's
all-reduces by wrapping ``torch.distributed.all_reduce`` (the gradient bytes and
the rest, batchgrad's control values). Also counted, not timed: batchgrad's first
call on the group, and a call on the model with the comm hook (two collectives
each). Prints a table (ratios to the no_sync loop) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import RESULTS, environment, time_on_ranks, write_results
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import batchgrad as bg
from batchgrad._distributed import launch
from batchgrad._models import mlp

METHODS = ("sync every micro-batch", "no_sync loop", "batchgrad")


def _worker(samples: int, counts: list[int], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = mlp((784, 256, 256, 10))
    ddp = DistributedDataParallel(model)  # timed: DDP as most users run it, no hook
    counted_model = copy.deepcopy(model)
    counted = DistributedDataParallel(counted_model)  # a counting hook sees DDP's buckets
    grad_calls: list[int] = []  # bytes of each gradient bucket all-reduced by DDP
    in_hook = [False]

    # No annotations: DDP checks them, and this module's are strings.
    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        grad_calls.append(buffer.numel() * buffer.element_size())
        in_hook[0] = True
        try:
            return allreduce_hook(dist.group.WORLD, bucket)
        finally:
            in_hook[0] = False

    counted.register_comm_hook(None, counting_hook)
    grad_numel = sum(p.numel() for p in model.parameters())
    calls: list[tuple[int, int]] = []  # other all-reduces: (gradient bytes, control bytes)
    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not in_hook[0]:
            size = tensor.element_size()
            grads = grad_numel if tensor.numel() >= grad_numel else 0
            calls.append((grads * size, (tensor.numel() - grads) * size))
        return plain_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # type: ignore[assignment]
    try:
        return _measure(ddp, counted, counted_model, grad_calls, calls, samples, counts, repeats)
    finally:
        dist.all_reduce = plain_all_reduce  # type: ignore[assignment]


def _measure(
    ddp: DistributedDataParallel,
    counted: DistributedDataParallel,
    counted_model: nn.Module,
    grad_calls: list[int],
    calls: list[tuple[int, int]],
    samples: int,
    micro_batch_counts: list[int],
    repeats: int,
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(samples, 784, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    model = ddp.module

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> bg.Loss:
        inputs, labels = batch
        return bg.Loss(F.cross_entropy(model(inputs), labels, reduction="sum"), len(labels))

    def count(step: Callable[[], None], module: nn.Module) -> dict[str, int]:
        module.zero_grad(set_to_none=True)
        grad_calls.clear()
        calls.clear()
        step()
        return {
            "grad_all_reduces": len(grad_calls) + sum(1 for g, _ in calls if g),
            "control_all_reduces": sum(1 for g, _ in calls if not g),
            "grad_bytes": sum(grad_calls) + sum(g for g, _ in calls),
            "control_bytes": sum(c for _, c in calls),
        }

    rows, other = [], {}
    for k in micro_batch_counts:
        size = samples // k
        parts = [(x[i : i + size], y[i : i + size]) for i in range(0, samples, size)]

        def every(ddp: DistributedDataParallel = ddp, parts: list[Any] = parts) -> None:
            for inputs, labels in parts:
                (F.cross_entropy(ddp(inputs), labels, reduction="sum") / samples).backward()

        def no_sync_loop(ddp: DistributedDataParallel = ddp, parts: list[Any] = parts) -> None:
            # no_sync must wrap the forward too: DDP prepares the reduction in forward.
            for inputs, labels in parts[:-1]:
                with ddp.no_sync():
                    (F.cross_entropy(ddp(inputs), labels, reduction="sum") / samples).backward()
            inputs, labels = parts[-1]
            (F.cross_entropy(ddp(inputs), labels, reduction="sum") / samples).backward()

        def batchgrad_step(ddp: DistributedDataParallel = ddp, size: int = size) -> None:
            bg.accumulate(ddp, loss_fn, (x, y), micro_batch_size=size)

        steps: dict[str, Callable[[], None]] = {
            METHODS[0]: every,
            METHODS[1]: no_sync_loop,
            METHODS[2]: batchgrad_step,
        }
        tallies = {
            METHODS[0]: count(partial(every, counted), counted_model),
            METHODS[1]: count(partial(no_sync_loop, counted), counted_model),
            # With a comm hook (the counting one) the agreement is an all-reduce apart
            # (counted the second time: the first follows calls without the hook).
            "batchgrad, comm hook": [
                count(partial(batchgrad_step, counted), counted_model) for _ in range(2)
            ][-1],
            # The first call on a group agrees apart; later ones in the gradient sum.
            "batchgrad, first call": count(batchgrad_step, model),
            METHODS[2]: count(batchgrad_step, model),
        }
        other[k] = {
            name: tallies[name] for name in ("batchgrad, comm hook", "batchgrad, first call")
        }
        times = time_on_ranks(model, steps, repeats)
        for name in steps:
            rows.append(
                {
                    "micro_batches_per_rank": k,
                    "method": name,
                    **tallies[name],
                    "median_ms": 1e3 * statistics.median(times[name]),
                }
            )
    return {"rows": rows, "counted_only": other}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--out", type=Path, default=RESULTS / "ddp_communication.json")
    args = parser.parse_args(argv)
    samples, counts, repeats = (64, [4, 16], args.repeats)
    if args.quick:
        samples, counts, repeats = (16, [4], 2)

    result = launch(_worker, 2, samples, counts, repeats, timeout=600)[0]
    rows = result["rows"]
    counted_only = result["counted_only"]
    for row in rows:
        reference = next(
            r
            for r in rows
            if r["micro_batches_per_rank"] == row["micro_batches_per_rank"]
            and r["method"] == METHODS[1]
        )
        row["time_ratio_vs_no_sync_loop"] = row["median_ms"] / reference["median_ms"]
        row["grad_bytes_ratio_vs_no_sync_loop"] = row["grad_bytes"] / reference["grad_bytes"]

    table = Table(
        title="DDP, 2 gloo processes, MLP 784-256-256-10, per logical batch "
        "(ratios to the no_sync loop)",
        title_justify="left",
    )
    for column in (
        "mb/rank",
        "method",
        "grad all-reduces",
        "grad MB",
        "control all-reduces",
        "control B",
        "step ms",
        "time ratio",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            str(row["micro_batches_per_rank"]),
            row["method"],
            str(row["grad_all_reduces"]),
            f"{row['grad_bytes'] / 1e6:.2f}",
            str(row["control_all_reduces"]),
            str(row["control_bytes"]),
            f"{row['median_ms']:.1f}",
            f"{row['time_ratio_vs_no_sync_loop']:.3f}",
        )
    Console(width=120).print(table)
    for k, tallies in counted_only.items():
        for name, tally in tallies.items():
            print(
                f"{k} mb/rank, {name} (counted, not timed): {tally['grad_all_reduces']} gradient "
                f"all-reduce(s) of {tally['grad_bytes'] / 1e6:.2f} MB, "
                f"{tally['control_all_reduces']} control all-reduce(s), "
                f"{tally['control_bytes']} control bytes"
            )
    write_results(
        args.out,
        {
            "benchmark": "ddp_communication",
            "environment": environment(processes=2, backend="gloo"),
            "settings": {"samples_per_rank": samples, "repeats": repeats},
            "rows": rows,
            "counted_only": counted_only,
        },
    )
    print(f"JSON written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
