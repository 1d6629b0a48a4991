"""Train a small language model with DDP and exact gradient accumulation.

Every optimizer step sees a logical batch of --batch-size sequences, shared by the
processes and, within each, split into micro-batches of --micro-batch-size. The
loss is the mean over all non-padded tokens of the logical batch, whatever the
split: the gradient equals one process on the whole batch.

    python examples/ddp_train.py                                   # one process, CPU
    torchrun --nproc_per_node=2 examples/ddp_train.py              # two processes, CPU (gloo)
    torchrun --nproc_per_node=8 examples/ddp_train.py --backend nccl          # 8 GPUs
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 examples/ddp_train.py --backend nccl               # 2 nodes

With nccl each process uses the GPU of its LOCAL_RANK; nothing else changes.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

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
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group(args.backend)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyLM(vocab=32, d_model=64, heads=4, layers=2, max_len=64).to(device)
    if distributed:
        # Gradients are synchronised once per logical batch: bg.accumulate runs every
        # micro-batch under no_sync(), then one all-reduce, divided by the global count.
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = counting_sequences(args.batch_size * args.steps, max_len=64, seed=1)

    for step in range(1, args.steps + 1):
        start = (step - 1) * args.batch_size
        # This rank's share of the logical batch: every world_size-th sequence.
        rows = torch.arange(start + rank, start + args.batch_size, world_size)
        local = TokenBatch(data.input_ids[rows].to(device), data.labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        report = bg.accumulate(model, loss_fn, local, micro_batch_size=args.micro_batch_size)
        optimizer.step()
        if rank == 0:
            print(
                f"step {step:3d}  loss {report.loss:.4f}  tokens {report.count:5d}  "
                f"grad norm {report.grad_norm:.3f}  ranks {report.world_size}",
                flush=True,
            )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
