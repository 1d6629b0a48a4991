"""Real model code under `torch.distributed`: Hugging Face GPT-2 (tied embeddings),
BERT and Llama from configs, on 3 gloo ranks with uneven shares and an idle rank,
DDP-wrapped (with and without ``find_unused_parameters``) and unwrapped, each equal
to one process on the whole padded batch (float64)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import batchgrad as bg
from batchgrad._distributed import launch
from tests.integrations import hf

N = 10
SHARDS = [(0, 2), (2, 2), (2, 10)]  # rank 1 holds no rows
WRAPS = ("ddp", "ddp-unused", "plain")


def loss_fn(name):
    def loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if name == "bert":
            return bg.Loss(F.cross_entropy(logits, batch["labels"], reduction="sum"), len(logits))
        targets = batch["labels"][:, 1:].reshape(-1)
        total = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="sum"
        )
        return bg.Loss(total, (targets != -100).sum())

    return loss


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _on_ranks():
    start, stop = SHARDS[dist.get_rank()]
    results = {}
    for name in hf.MODELS:
        whole = hf.stack(hf.build_data(name, N), range(N))
        batch = {key: value[start:stop] for key, value in whole.items()}  # 0 rows on rank 1
        for wrap in WRAPS:
            model = hf.build_model(name, torch.float64)
            wrapped = model
            if wrap != "plain":
                wrapped = DistributedDataParallel(
                    model, find_unused_parameters=wrap == "ddp-unused"
                )
            for call in range(2):  # the second call's agreement rides in the gradient sum
                model.zero_grad(set_to_none=True)
                report = bg.accumulate(wrapped, loss_fn(name), batch, micro_batch_size=3)
                results[name, wrap, call] = (_grads(model), report.loss, report.count)
    return results


@pytest.fixture(scope="module")
def ranks():
    return launch(_on_ranks, len(SHARDS), timeout=300)


# Llama computes its RMSNorm and rotary embeddings in float32 even in a float64 model,
# so its gradient moves by float32 rounding with the scale of the backward's root: the
# first micro-batch's presumed 1 / N̂ (tokens per row vary) against the whole batch's
# 1 / N. A hand-written loop backpropagating 1 / N̂ is off by as much (5.6e-8).
TOLERANCE = {"gpt2": 1e-10, "bert": 1e-10, "llama": 1e-6}


@pytest.mark.parametrize("name", hf.MODELS)
@pytest.mark.parametrize("wrap", WRAPS)
def test_hugging_face_models_across_ranks_equal_one_process(ranks, name, wrap):
    model = hf.build_model(name, torch.float64)
    data = hf.build_data(name, N)
    reference = bg.accumulate(model, loss_fn(name), hf.stack(data, range(N)))
    expected = _grads(model)
    # BERT's key biases have a gradient of exactly 0 (softmax ignores a shift shared by
    # every key): rounding there is measured against the whole gradient's size.
    floor = 1e-3 * torch.cat([g.flatten() for g in expected.values() if g is not None]).norm()
    for rank, results in enumerate(ranks):
        for call in range(2):
            grads, loss, count = results[name, wrap, call]
            assert count == reference.count
            assert loss == pytest.approx(reference.loss, rel=1e-12)
            for param, grad in grads.items():
                want = expected[param]
                if want is None:
                    assert grad is None, (rank, param)
                    continue
                err = float((grad - want).norm() / torch.maximum(want.norm(), floor))
                assert err <= TOLERANCE[name], (rank, call, param, err)
