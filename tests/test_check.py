import re

import pytest
import torch
from torch import nn

import batchgrad as bg
from tests.cases import CASE_IDS, CASES


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_proves_equivalence_and_measures_the_naive_recipe(case):
    model, batch = case.build(12, torch.float64, seed=2)
    report = bg.check(model, case.loss_fn, batch, micro_batch_size=5)
    assert report.ok
    assert report.max_rel_err <= 1e-10
    assert report.naive_rel_err > 0.01
    assert report.findings == ()
    assert set(report.per_param) == {name for name, _ in model.named_parameters()}
    assert max(report.per_param.values()) <= 1e-9
    assert report.micro_batches == 3


def test_float32_tolerance():
    case = CASES[0]
    model, batch = case.build(12, torch.float32, seed=2)
    report = bg.check(model, case.loss_fn, batch, micro_batch_size=5)
    assert report.ok
    assert report.tolerance == 1e-5


def _loss(model, batch):
    x, y = batch
    return bg.Loss.from_criterion(nn.MSELoss(), model(x), y)


class Center(nn.Module):
    """Subtracts the batch mean: a sample's output depends on the others."""

    def forward(self, x):
        return x - x.mean(dim=0)


class Noise(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


class Block(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(self.inner(x))


@pytest.mark.parametrize(
    ("layer", "name", "kind", "message"),
    [
        (nn.BatchNorm1d(4), "1", "batchnorm", r"1 \(BatchNorm1d\).*eval mode.*GroupNorm"),
        (nn.Dropout(0.3), "1", "dropout", r"1 \(Dropout\) drops activations"),
        (Block(Center()), "1.inner", "couples-samples", r"1\.inner \(Center\).*other samples"),
        (Block(Noise()), "1.inner", "random", r"1\.inner \(Noise\).*random"),
    ],
    ids=["batchnorm", "dropout", "custom-coupling", "custom-random"],
)
def test_findings_name_the_module_that_breaks_equivalence(layer, name, kind, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 1)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    report = bg.check(model, _loss, (x, y), micro_batch_size=4)
    [finding] = report.findings  # the innermost module only, not its parents
    assert (finding.module, finding.kind) == (name, kind)
    assert re.search(message, finding.message)
    if kind in ("batchnorm", "couples-samples"):
        assert not report.ok
    # Random layers may still agree when the draws happen to line up; `ok` is
    # what was measured, the finding says why it cannot be relied on.


def test_eval_mode_removes_the_findings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    model = model.double().eval()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    report = bg.check(model, _loss, (x, y), micro_batch_size=4)
    assert report.ok
    assert report.findings == ()


def test_check_restores_parameters_buffers_rng_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, 1))
    model = model.double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    _loss(model, (x, y)).total.backward()
    model[3].bias.grad = None
    grads = [p.grad for p in model.parameters()]
    grad_values = [None if g is None else g.clone() for g in grads]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()

    bg.check(model, _loss, (x, y), micro_batch_size=4)

    for p, value, grad, grad_value in zip(
        model.parameters(), params, grads, grad_values, strict=True
    ):
        assert torch.equal(p, value)
        assert p.grad is grad
        if grad is not None:
            assert torch.equal(p.grad, grad_value)
    for buffer, value in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(buffer, value)
    assert torch.equal(torch.get_rng_state(), rng)


def test_sum_reduction_naive_recipe_is_off_by_the_micro_batch_count():
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    report = bg.check(model, _loss, (x, y), micro_batch_size=2, reduction="sum")
    assert report.ok
    assert report.naive_rel_err == pytest.approx(1 - 1 / 4)


def test_check_needs_a_structured_batch():
    with pytest.raises(bg.ConfigError, match="whole logical batch"):
        bg.check(nn.Linear(1, 1), _loss, iter([]), micro_batch_size=1)


def test_check_needs_trainable_parameters():
    model = nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(bg.ConfigError, match="no parameter that requires grad"):
        bg.check(model, _loss, (torch.ones(2, 1), torch.ones(2, 1)), micro_batch_size=1)


def test_check_errors_restore_the_model():
    model = nn.Linear(3, 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    x[4] = float("nan")
    weight = model.weight.detach().clone()
    with pytest.raises(bg.NonFiniteError):
        bg.check(model, _loss, (x, torch.zeros(6, 1, dtype=torch.float64)), micro_batch_size=2)
    assert torch.equal(model.weight, weight)
    assert model.weight.grad is None


def test_data_parallel_check_needs_a_process():
    with pytest.raises(bg.ConfigError, match="nproc must be at least 1, got 0"):
        bg._check.check_data_parallel(lambda: None, 0, micro_batch_size=2)


class TinyGPT(nn.Module):
    """nanoGPT's calling convention: ``forward(idx, targets) -> (logits, loss)``."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, vocab)

    def forward(self, idx, targets=None):
        logits = self.head(self.block(self.embed(idx)))
        if targets is None:
            return logits, None
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss  # a 0-d batch mean next to the per-sample logits


def test_a_batch_mean_returned_next_to_the_logits_is_not_coupling():
    torch.manual_seed(0)
    model = TinyGPT().double()
    idx = torch.randint(0, 11, (6, 5))

    def loss_fn(model, batch):
        logits, _ = model(batch[:, :-1], batch[:, 1:])
        values = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        return bg.Loss.from_values(values)

    report = bg.check(model, loss_fn, idx, micro_batch_size=4)
    assert report.ok
    assert report.findings == ()


def test_a_module_that_computes_in_float32_sets_the_tolerance_and_is_named():
    class UpcastNorm(nn.Module):  # Llama's RMSNorm
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            dtype = x.dtype
            x = x.to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * x.to(dtype)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), UpcastNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    report = bg.check(model, _loss, (x, y), micro_batch_size=4)

    assert report.ok
    assert report.tolerance == 1e-5
    (finding,) = report.findings
    assert (finding.module, finding.kind, finding.dtype) == ("1", "precision", torch.float32)
    assert "1 (UpcastNorm) compute in float32 inside a float64 model" in finding.message
    # a tolerance given is kept, and the finding is still there to explain a miss
    strict = bg.check(model, _loss, (x, y), micro_batch_size=4, tolerance=1e-12)
    assert strict.tolerance == 1e-12
    assert [f.kind for f in strict.findings] == ["precision"]


def test_float32_constants_in_a_float64_model_are_no_precision_finding():
    class Masked(nn.Module):
        def forward(self, x):
            return x * torch.ones(x.shape[-1])  # float32 ones, upcast: no precision lost

    model = nn.Sequential(nn.Linear(6, 3), Masked()).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    report = bg.check(model, _loss, (x, y), micro_batch_size=4)
    assert report.ok
    assert report.findings == ()
    assert report.tolerance == 1e-10


def test_a_float64_llama_from_a_config_checks_ok_and_names_its_float32_modules():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 50, (5, 7))

    def loss_fn(model, batch):
        return bg.Loss.from_causal_lm(model(input_ids=batch).logits, batch)

    report = bg.check(model, loss_fn, ids, micro_batch_size=2)
    assert report.ok, report
    kinds = {f.kind for f in report.findings}
    assert kinds == {"precision"}
    assert any("RMSNorm" in f.message for f in report.findings)


class _HiddenUse(nn.Module):
    """Its weight is used where no trace sees it (as a compiled kernel would): micro-
    batching is exact, per-sample gradients would miss that use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        with torch._C.DisableTorchFunction():
            return h + torch.tanh(x @ self.lin.weight.T)


def _values(model, x):
    return bg.Loss.from_values(model(x).pow(2).sum(1))


def test_check_reports_whether_per_sample_gradients_pass_their_guard():
    torch.manual_seed(0)
    x = torch.randn(6, 3).double()
    clean = bg.check(nn.Linear(3, 2).double(), _values, x, micro_batch_size=4)
    assert clean.ok
    assert clean.per_sample is True
    assert clean.findings == ()
    hidden = bg.check(_HiddenUse().double(), _values, x, micro_batch_size=4)
    assert hidden.ok  # micro-batching itself is exact
    assert hidden.per_sample is False
    (finding,) = hidden.findings
    assert finding.kind == "per-sample"
    assert re.search(r"'lin\.weight' .* do not add up", finding.message)
    coupled = bg.check(
        nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double(), _values, x, micro_batch_size=4
    )
    assert coupled.per_sample is None  # the batchnorm finding says it already
    assert [f.kind for f in coupled.findings] == ["batchnorm"]
