"""batchgrad's Lightning integration against an exact whole-batch SGD step.

A padded token model, 26 rows in batches of 4, 4 batches per step: windows of 4
and 3 batches (the last of 2 rows), the short last window of the epoch. The stock
``Trainer(accumulate_grad_batches=4)`` is measured on the same setup.
"""

import pytest

pytest.importorskip("lightning")

import torch

import batchgrad as bg
from tests.integrations import lit
from tests.integrations.launch import spawn

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
    # Lightning 2.6 still uses torch's LeafSpec, deprecated in torch 2.13.
    "ignore:.*LeafSpec.*:FutureWarning",
)

N = 26
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_every_step_is_the_exact_whole_batch_step_and_the_stock_one_is_not(dtype):
    _, steps = lit.fit(lit.Exact(dtype), N)
    assert [len(rows) for rows, _, _ in steps] == [16, 10]  # the short last window
    exact = lit.step_errors(steps, N, dtype)
    assert max(exact) <= TOLERANCE[dtype]
    _, stock_steps = lit.fit(lit.Stock(dtype), N, accumulate=4)
    stock = lit.step_errors(stock_steps, N, dtype)
    print(f"{dtype}: batchgrad {exact}, stock Lightning {stock}")
    assert min(stock) > 1e-3  # per-batch means weighed alike; the last window divided by 4


def test_clipping_logging_and_the_report_follow_the_exact_objective():
    clip = 0.05
    trainer, steps = lit.fit(lit.Exact(torch.float64, clip=clip), N)
    assert max(lit.step_errors(steps, N, torch.float64, clip=clip)) <= 1e-9
    module = trainer.lightning_module
    report = module.accumulate_report
    assert report.micro_batches == 3
    data = lit.build_data(N)
    assert report.count == sum(int((data[i]["labels"][1:] != -100).sum()) for i in steps[-1][0])
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(report.loss, rel=1e-6)
    assert trainer.callback_metrics["grad_norm"].item() == pytest.approx(report.grad_norm)


class _NotALoss(lit.Exact):
    def training_loss(self, batch):
        return super().training_loss(batch).mean()


class _AutoOn(lit.Exact):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = True


def test_a_training_loss_that_is_no_bg_loss_is_refused():
    with pytest.raises(bg.LossTypeError, match="training_loss returned a Tensor"):
        lit.fit(_NotALoss(), 8)


def test_automatic_optimisation_cannot_be_turned_back_on():
    with pytest.raises(bg.ConfigError, match="automatic_optimization"):
        _AutoOn()


def test_a_bad_window_size_is_refused():
    module = lit.Exact()
    module.accumulate_grad_batches = 0
    with pytest.raises(bg.ConfigError, match="accumulate_grad_batches"):
        lit.fit(module, 8)


def _rank(dtype):
    from lightning.pytorch.strategies import DDPStrategy

    out = {}
    exact = lit.Exact(dtype)
    exact.accumulate_grad_batches = 3
    for label, module, accumulate in (("exact", exact, 1), ("stock", lit.Stock(dtype), 3)):
        strategy = DDPStrategy(process_group_backend="gloo")
        trainer, steps = lit.fit(module, N, accumulate=accumulate, strategy=strategy, devices=2)
        assert trainer.world_size == 2
        out[label] = steps
    return out


def test_the_ddp_strategy_takes_the_exact_step_of_both_ranks_windows():
    ranks = spawn(_rank, 2, torch.float64, timeout=300)
    errors = {}
    for label in ("exact", "stock"):
        steps = []
        for (rows0, before0, after0), (rows1, before1, after1) in zip(
            ranks[0][label], ranks[1][label], strict=True
        ):
            assert torch.equal(before0, before1)  # the replicas agree
            assert torch.equal(after0, after1)
            steps.append((rows0 + rows1, before0, after0))
        # 13 rows per rank in batches of 4, 4, 4 | 1: a short last window of one row each
        assert [len(rows) for rows, _, _ in steps] == [24, 2]
        errors[label] = lit.step_errors(steps, N, torch.float64)
    print(f"2 ranks: batchgrad {errors['exact']}, stock Lightning {errors['stock']}")
    assert max(errors["exact"]) <= 1e-10


class _ScaledPrecision(lit.Exact):
    def on_fit_start(self):
        # What precision="16-mixed" sets up on a GPU (on CPU Lightning runs bf16, unscaled).
        self.trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu")
        super().on_fit_start()


def test_loss_scaling_is_refused_before_any_step():
    module = _ScaledPrecision()
    before = lit.flat(module)
    with pytest.raises(bg.ConfigError, match="16-bit mixed precision"):
        lit.fit(module, 8)
    assert torch.equal(lit.flat(module), before)
