"""Communication per logical batch under FSDP2: batchgrad vs the two usual loops.

    python benchmarks/fsdp_communication.py            # a few minutes on 2 CPU cores
    python benchmarks/fsdp_communication.py --quick    # seconds: a smoke run

Two local gloo processes train a transformer LM sharded with ``fully_shard`` per
layer and at the root, on right-padded sequences (the loss is the mean over real
tokens); each rank holds 16 sequences of the logical batch, in 4 or 16
micro-batches. Per logical batch it counts FSDP's all-gathers and reduce-scatters
and their bytes, the other (control) all-reduces, the gradient bytes held between
micro-batches (unsharded and sharded, at most), and times the step (batchgrad's
first call, with its one-off 0-row rehearsal, is counted apart). Side by side:

- "torchtitan loop": all-reduce the global token count, then every micro-batch
  backpropagates ``sum / global_tokens`` with FSDP summing
  (``set_gradient_divide_factor(1.0)``, ``set_force_sum_reduction_for_comms``)
  and reduce-scatters;
- "no-sync loop": the same, with ``set_requires_gradient_sync(False)`` on every
  micro-batch but the last (one reduce-scatter);
- "batchgrad once" / "batchgrad per_micro_batch": ``bg.accumulate(model, ...,
  grad_sync=...)``, which needs no count in advance.

Prints a table (ratios to the hand-written loop with the same reduce-scatters) and
writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import RESULTS, environment, time_on_ranks, write_results
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

import batchgrad as bg
from batchgrad._data import TokenBatch, counting_sequences
from batchgrad._models import TinyLM

METHODS = ("torchtitan loop", "no-sync loop", "batchgrad per_micro_batch", "batchgrad once")
# The hand-written loop each batchgrad mode is compared with (the same reduce-scatters).
REFERENCE = {
    METHODS[0]: METHODS[0],
    METHODS[1]: METHODS[1],
    METHODS[2]: METHODS[0],
    METHODS[3]: METHODS[1],
}


class _Counter:
    """Counts the collectives FSDP and batchgrad issue (patched ``torch.distributed``)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = {"all_gather": [], "reduce_scatter": [], "control": []}
        self.plain = {
            name: getattr(dist, name)
            for name in ("all_gather_single", "reduce_scatter_single", "all_reduce")
        }

    def install(self) -> None:
        def wrap(name: str, kind: str) -> Callable[..., Any]:
            plain = self.plain[name]

            def counted(*args: Any, **kwargs: Any) -> Any:
                tensor = args[1] if name != "all_reduce" and len(args) > 1 else None
                if tensor is None:
                    tensor = kwargs.get("input", args[0] if args else None)
                self.calls[kind].append(tensor.numel() * tensor.element_size())
                return plain(*args, **kwargs)

            return counted

        dist.all_gather_single = wrap("all_gather_single", "all_gather")  # type: ignore[assignment]
        dist.reduce_scatter_single = wrap("reduce_scatter_single", "reduce_scatter")  # type: ignore[assignment]
        dist.all_reduce = wrap("all_reduce", "control")  # type: ignore[assignment]

    def remove(self) -> None:
        for name, plain in self.plain.items():
            setattr(dist, name, plain)

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()


def _held_grad_bytes(model: nn.Module) -> int:
    """Gradient bytes held now: FSDP's unsharded gradients and the sharded ones."""
    total = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                for grad in (
                    fsdp_param.unsharded_accumulated_grad,
                    getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None),
                    fsdp_param.sharded_param.grad,
                ):
                    if grad is not None:
                        local = grad.to_local() if hasattr(grad, "to_local") else grad
                        total += local.numel() * local.element_size()
    return total


def _worker(sequences: int, counts: list[int], repeats: int, layers: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyLM(vocab=64, d_model=128, heads=4, layers=layers, max_len=64)
    for block in model.blocks.layers:
        fully_shard(block)
    fully_shard(model)
    assert isinstance(model, FSDPModule)
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    data = counting_sequences(sequences * world, vocab=64, max_len=64, seed=1)
    rows = torch.arange(rank * sequences, (rank + 1) * sequences)
    batch = TokenBatch(data.input_ids[rows], data.labels[rows])
    counter = _Counter()
    peak = [0]

    def loss_fn(m: nn.Module, part: TokenBatch) -> bg.Loss:
        peak[0] = max(peak[0], _held_grad_bytes(model))  # what the earlier ones left
        return bg.Loss.from_causal_lm(m(part.input_ids), part.labels)

    # A model's first call with a loss function starts with a 0-row rehearsal step:
    # what it issues beyond a later call, counted once (and kept out of the rows).
    calls = []
    counter.install()
    try:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            counter.clear()
            bg.accumulate(model, loss_fn, batch, micro_batch_size=sequences)  # type: ignore[arg-type]
            calls.append(_counts(counter))
    finally:
        counter.remove()
    first_call = {key: calls[0][key] - calls[1][key] for key in calls[0]}

    results = []
    for k in counts:
        size = sequences // k
        parts = [TokenBatch(*(t[i : i + size] for t in batch)) for i in range(0, sequences, size)]

        def hand_written(sync_every: bool, parts: list[TokenBatch] = parts) -> None:
            # torchtitan's recipe: count the global tokens first, FSDP sums.
            tokens = torch.tensor(
                float(sum(int((p.labels[:, 1:] != -100).sum()) for p in parts)),
                dtype=torch.float64,
            )
            dist.all_reduce(tokens)
            # Per FSDP module: these two setters are not recursive (on the root alone the
            # blocks would still average over the ranks: half the gradient on 2 ranks).
            for module in sharded:
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
            for index, part in enumerate(parts):
                if not sync_every:
                    model.set_requires_gradient_sync(index == len(parts) - 1)
                loss = loss_fn(model, part)
                (loss.total / float(tokens)).backward()
            peak[0] = max(peak[0], _held_grad_bytes(model))
            model.set_requires_gradient_sync(True)

        def batchgrad_step(grad_sync: str, size: int = size) -> None:
            bg.accumulate(model, loss_fn, batch, micro_batch_size=size, grad_sync=grad_sync)  # type: ignore[arg-type]
            peak[0] = max(peak[0], _held_grad_bytes(model))

        steps: dict[str, Callable[[], None]] = {
            METHODS[0]: lambda: hand_written(True),
            METHODS[1]: lambda: hand_written(False),
            METHODS[2]: lambda: batchgrad_step("per_micro_batch"),
            METHODS[3]: lambda: batchgrad_step("once"),
        }
        counted: dict[str, dict[str, int]] = {}
        grads: dict[str, list[torch.Tensor]] = {}
        counter.install()
        try:
            for name, step in steps.items():  # one counted step each
                model.zero_grad(set_to_none=True)
                counter.clear()
                peak[0] = 0
                step()
                counted[name] = {**_counts(counter), "peak_grad_bytes": peak[0]}
                grads[name] = [p.grad.to_local().clone() for p in model.parameters()]  # type: ignore[union-attr]
        finally:
            counter.remove()
        reference = grads[METHODS[0]]
        agree = {
            name: max(
                float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                for g, r in zip(grads[name], reference, strict=True)
            )
            for name in steps
        }
        times = time_on_ranks(model, steps, repeats)
        for name in steps:
            results.append(
                {
                    "micro_batches_per_rank": k,
                    "method": name,
                    **counted[name],
                    "max_rel_diff_vs_torchtitan": agree[name],
                    "median_ms": 1e3 * statistics.median(times[name]),
                }
            )
    return {"rows": results, "first_call": first_call}


def _counts(counter: _Counter) -> dict[str, int]:
    return {
        "all_gathers": len(counter.calls["all_gather"]),
        "all_gather_bytes": sum(counter.calls["all_gather"]),
        "reduce_scatters": len(counter.calls["reduce_scatter"]),
        "reduce_scatter_bytes": sum(counter.calls["reduce_scatter"]),
        "control_all_reduces": len(counter.calls["control"]),
        "control_bytes": sum(counter.calls["control"]),
    }


def main(argv: list[str] | None = None) -> int:
    from batchgrad._distributed import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="(each process uses 1)")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp_communication.json")
    args = parser.parse_args(argv)
    sequences, counts, repeats, layers = (16, [4, 16], args.repeats, 4)
    if args.quick:
        sequences, counts, repeats, layers = (8, [4], 1, 2)

    measured = launch(_worker, 2, sequences, counts, repeats, layers, timeout=900)[0]
    rows, first_call = measured["rows"], measured["first_call"]
    for row in rows:
        reference = next(
            r
            for r in rows
            if r["micro_batches_per_rank"] == row["micro_batches_per_rank"]
            and r["method"] == REFERENCE[row["method"]]
        )
        row["compared_with"] = REFERENCE[row["method"]]
        row["time_ratio"] = row["median_ms"] / reference["median_ms"]
        row["reduce_scatter_bytes_ratio"] = (
            row["reduce_scatter_bytes"] / reference["reduce_scatter_bytes"]
        )

    table = Table(
        title=f"FSDP2, 2 gloo processes, TinyLM ({layers} layers, d=128), {sequences} padded "
        f"sequences per rank, per logical batch (ratios to the loop with the same "
        f"reduce-scatters)",
        title_justify="left",
    )
    columns = (
        "mb/rank",
        "method",
        "all-gathers",
        "AG MB",
        "reduce-scatters",
        "RS MB",
        "control",
        "control B",
        "peak grad MB",
        "step ms",
        "time ratio",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            str(row["micro_batches_per_rank"]),
            row["method"],
            str(row["all_gathers"]),
            f"{row['all_gather_bytes'] / 1e6:.2f}",
            str(row["reduce_scatters"]),
            f"{row['reduce_scatter_bytes'] / 1e6:.2f}",
            str(row["control_all_reduces"]),
            str(row["control_bytes"]),
            f"{row['peak_grad_bytes'] / 1e6:.2f}",
            f"{row['median_ms']:.1f}",
            f"{row['time_ratio']:.3f}",
        )
    console = Console(width=160)
    console.print(table)
    console.print(
        f"batchgrad's first call on the model (its 0-row rehearsal, once) issues "
        f"{first_call['all_gathers']} all-gathers ({first_call['all_gather_bytes'] / 1e6:.2f} "
        f"MB), {first_call['reduce_scatters']} reduce-scatters and "
        f"{first_call['control_all_reduces']} control all-reduces more than a later call."
    )
    write_results(
        args.out,
        {
            "benchmark": "fsdp_communication",
            "environment": environment(processes=2, backend="gloo"),
            "settings": {"sequences_per_rank": sequences, "repeats": repeats, "layers": layers},
            "rows": rows,
            "first_call_extra": first_call,
        },
    )
    print(f"JSON written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
