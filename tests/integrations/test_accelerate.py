"""`bg.accumulate` on a model and optimizer prepared by accelerate (DDP, 2 processes).

accelerate's own recipe (``with accelerator.accumulate(model)`` and each
micro-batch's mean) is measured on the same setup for the record.
"""

import pytest

pytest.importorskip("accelerate")

import torch

import batchgrad as bg
from tests.integrations import lit
from tests.integrations.launch import spawn

N, PER_RANK, MICRO = 26, 13, 4


def _loss(model, batch):
    return bg.Loss.from_causal_lm(model(batch["input_ids"]), batch["labels"])


def _rank(dtype):
    from accelerate import Accelerator
    from torch.nn import functional as F

    out = {}
    for recipe in ("batchgrad", "accelerate"):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=PER_RANK // MICRO + 1)
        net = lit.build_net(dtype)
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        # batchgrad takes this rank's 13 rows of the logical batch of 26 at once;
        # accelerate's recipe iterates its micro-batches (4, 4, 4, 1 rows).
        size = PER_RANK if recipe == "batchgrad" else MICRO
        loader = torch.utils.data.DataLoader(
            lit.build_data(N), batch_size=size, collate_fn=lit.collate
        )
        model, optimizer, loader = accelerator.prepare(net, optimizer, loader)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        before, rows = lit.flat(net), []
        for batch in loader:
            rows += batch["idx"].tolist()
            if recipe == "batchgrad":
                report = bg.accumulate(model, _loss, batch, micro_batch_size=MICRO)
                assert report.world_size == 2
                accelerator.clip_grad_norm_(model.parameters(), 1e9)  # as a loop would
                optimizer.step()
                optimizer.zero_grad()
            else:  # each micro-batch's mean, divided by the accumulation steps
                with accelerator.accumulate(model):
                    logits = model(batch["input_ids"])
                    loss = F.cross_entropy(
                        logits[:, :-1].reshape(-1, lit.VOCAB), batch["labels"][:, 1:].reshape(-1)
                    )
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
        out[recipe] = [(rows, before, lit.flat(net))]
    return out


def test_accumulate_on_a_prepared_ddp_model_is_the_exact_global_step():
    ranks = spawn(_rank, 2, torch.float64, timeout=300)
    errors = {}
    for recipe in ("batchgrad", "accelerate"):
        steps = []
        for (rows0, b0, a0), (rows1, b1, a1) in zip(
            ranks[0][recipe], ranks[1][recipe], strict=True
        ):
            assert torch.equal(b0, b1)
            assert torch.equal(a0, a1)
            steps.append((rows0 + rows1, b0, a0))
        errors[recipe] = lit.step_errors(steps, N, torch.float64)
    print(f"accelerate, 2 ranks: batchgrad {errors['batchgrad']}, recipe {errors['accelerate']}")
    assert max(errors["batchgrad"]) <= 1e-10
    assert max(errors["accelerate"]) > 1e-3
