"""Train a small language model sharded with FSDP2, with exact gradient accumulation.

Every optimizer step sees a logical batch of --batch-size sequences, shared by the
processes and, within each, split into micro-batches of --micro-batch-size; a rank
may hold fewer micro-batches than another (here the last rank gets --short fewer
sequences), or none. The loss is the mean over all non-padded tokens of the logical
batch: each p.grad (a DTensor shard) is the whole batch's gradient, as in one process.

    torchrun --nproc_per_node=2 examples/fsdp_train.py                  # CPU (gloo)
    torchrun --nproc_per_node=2 examples/fsdp_train.py --grad-sync per_micro_batch
    torchrun --nproc_per_node=8 examples/fsdp_train.py --backend nccl   # 8 GPUs

On GPUs the one change is the backend (--backend nccl): each process then uses the
GPU of its LOCAL_RANK and the device mesh is built on "cuda".
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import batchgrad as bg
from batchgrad._data import TokenBatch, counting_sequences
from batchgrad._models import TinyLM


def loss_fn(model, batch):
    return bg.Loss.from_causal_lm(model(batch.input_ids), batch.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="logical batch, all ranks")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--short", type=int, default=5, help="sequences the last rank lacks")
    parser.add_argument("--grad-sync", choices=["once", "per_micro_batch"], default="once")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device_type = "cpu"
    if args.backend == "nccl":  # the one change for GPUs
        device_type = "cuda"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(device_type, (world_size,))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyLM(vocab=32, d_model=64, heads=4, layers=2, max_len=64).to(device_type)
    for block in model.blocks.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = counting_sequences(args.batch_size * args.steps, max_len=64, seed=1)

    for step in range(1, args.steps + 1):
        start = (step - 1) * args.batch_size
        # This rank's share of the logical batch: a contiguous slice, the last one short.
        bounds = torch.linspace(0, args.batch_size + args.short, world_size + 1).long()
        bounds = bounds.clamp(max=args.batch_size)
        rows = torch.arange(start + int(bounds[rank]), start + int(bounds[rank + 1]))
        local = TokenBatch(data.input_ids[rows].to(device_type), data.labels[rows].to(device_type))
        optimizer.zero_grad(set_to_none=True)
        report = bg.accumulate(
            model,
            loss_fn,
            local,
            micro_batch_size=args.micro_batch_size,
            grad_sync=args.grad_sync,
        )
        optimizer.step()
        if rank == 0:
            print(
                f"step {step:3d}  loss {report.loss:.4f}  tokens {report.count:5d}  "
                f"grad norm {report.grad_norm:.3f}  ranks {report.world_size}  "
                f"micro-batches {report.micro_batches}",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
