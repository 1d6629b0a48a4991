"""fit: the bookkeeping of each regime, steps against plain PyTorch loops, resuming, ranks."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._data import digits
from batchgrad._distributed import launch

N = 10


def make_data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    return x, x @ w + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def mse(model, batch):
    x, y = batch
    return bg.Loss.from_criterion(nn.MSELoss(), model(x), y)


def run(model, data, lr=0.1, momentum=0.0, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return bg.fit(model, mse, data, optimizer, progress=False, **kwargs)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def rel_err(got, expected):
    diff = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(got, expected, strict=True)))
    return diff / math.sqrt(sum(float(b.square().sum()) for b in expected))


# ---- bookkeeping: steps, epochs, samples seen ----------------------------------------


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "sizes"),
    [
        (1, False, [1] * 10),  # stochastic
        (4, False, [4, 4, 2]),  # mini-batch, the last one smaller
        (4, True, [4, 4]),
        (10, False, [10]),
        ("full", False, [10]),  # full-batch
    ],
    ids=["stochastic", "mini-batch", "drop-last", "b=n", "full"],
)
def test_steps_epochs_and_samples_of_each_regime(batch_size, drop_last, sizes):
    history = run(make_model(), make_data(), batch_size=batch_size, drop_last=drop_last, epochs=2)

    per_epoch = sum(sizes)
    cumulative = list(itertools.accumulate(sizes * 2))
    assert [r.step for r in history.steps] == list(range(1, 2 * len(sizes) + 1))
    assert [r.batch_size for r in history.steps] == sizes * 2
    assert [r.samples_seen for r in history.steps] == cumulative
    assert [r.epoch for r in history.steps] == pytest.approx([c / per_epoch for c in cumulative])
    assert history.steps[len(sizes) - 1].epoch == 1.0
    assert (history.step, history.epoch, history.samples_seen) == (
        2 * len(sizes),
        2.0,
        2 * per_epoch,
    )
    assert (history.epoch_index, history.epoch_offset) == (2, 0)
    assert all(r.count == r.batch_size for r in history.steps)  # MSE on 1 output: a unit per row


def test_steps_stops_mid_epoch_and_whichever_comes_first():
    history = run(make_model(), make_data(), batch_size=4, steps=5)
    assert [r.epoch for r in history.steps] == [0.4, 0.8, 1.0, 1.4, 1.8]
    assert (history.step, history.epoch, history.samples_seen) == (5, 1.8, 18)
    assert (history.epoch_index, history.epoch_offset) == (1, 8)

    assert run(make_model(), make_data(), batch_size=4, steps=5, epochs=1).step == 3
    assert run(make_model(), make_data(), batch_size=4, steps=50, epochs=2).step == 6


def test_records_loss_norm_learning_rate_and_time():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = bg.fit(
        model,
        mse,
        make_data(),
        optimizer,
        batch_size=4,
        epochs=1,
        scheduler=scheduler,
        progress=False,
    )
    assert [r.lr for r in history.steps] == [0.1, 0.05, 0.025]  # the rate each step used
    assert optimizer.param_groups[0]["lr"] == 0.0125
    times = [r.wall_time for r in history.steps]
    assert times == sorted(times)
    assert history.wall_time >= times[-1]
    assert all(r.loss > 0 and r.grad_norm > 0 for r in history.steps)
    assert all(r.b_simple is r.grad_sq is r.trace_cov is None for r in history.steps)


# ---- the updates equal plain PyTorch --------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_full_batch_step_is_the_exact_full_dataset_gradient_step(reduction):
    data, lr = make_data(), 0.05
    model, reference = make_model(), make_model()
    run(model, data, lr=lr, batch_size="full", micro_batch_size=3, epochs=2, reduction=reduction)

    x, y = data
    for _ in range(2):  # one plain backward over the whole data set per epoch
        loss = F.mse_loss(reference(x), y, reduction=reduction)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads, strict=True):
                p -= lr * g
    assert rel_err(params(model), params(reference)) <= 1e-10


def test_full_batch_with_a_variable_number_of_units_per_sample_is_token_normalised():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(N, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 6, 2, 5, 1, 3, 6, 1, 4, 2])
    mask = torch.arange(6) < lengths[:, None]  # 31 units, unevenly spread over rows
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    reference = nn.Linear(2, 1).double()
    reference.load_state_dict(model.state_dict())

    def masked(model, batch):
        x, y, mask = batch
        return bg.Loss.from_values((model(x).squeeze(-1) - y).square(), mask)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = bg.fit(
        model,
        masked,
        (x, y, mask),
        optimizer,
        batch_size="full",
        micro_batch_size=3,
        epochs=1,
        progress=False,
    )

    values = (reference(x).squeeze(-1) - y).square()
    loss = (values * mask).sum() / mask.sum()  # the mean over every unit of the data set
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    with torch.no_grad():
        expected = [p - 0.1 * g for p, g in zip(reference.parameters(), grads, strict=True)]
    assert rel_err(params(model), expected) <= 1e-10
    assert history.steps[0].count == 31
    assert history.steps[0].loss == pytest.approx(float(loss.detach()), rel=1e-12)


def test_mini_batch_epochs_equal_a_plain_loop_over_the_same_order():
    data, seed = make_data(), 5
    model, reference = make_model(), make_model()
    run(model, data, momentum=0.9, batch_size=4, micro_batch_size=3, epochs=2, seed=seed)

    x, y = data
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):  # the documented order of epoch e
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch))
        for rows in order.split(4):
            optimizer.zero_grad()
            F.mse_loss(reference(x[rows]), y[rows]).backward()
            optimizer.step()
    assert rel_err(params(model), params(reference)) <= 1e-10


def test_without_shuffle_batches_follow_the_data_set_order():
    data = make_data()
    model, reference = make_model(), make_model()
    run(model, data, batch_size=4, epochs=1, shuffle=False)
    x, y = data
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for rows in torch.arange(N).split(4):
        optimizer.zero_grad()
        F.mse_loss(reference(x[rows]), y[rows]).backward()
        optimizer.step()
    assert rel_err(params(model), params(reference)) <= 1e-10


# ---- resuming ---------------------------------------------------------------------------


def _setup():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


@pytest.mark.parametrize("first", [{"epochs": 1}, {"steps": 4}], ids=["epoch-end", "mid-epoch"])
def test_a_resumed_run_continues_where_the_first_stopped(first, tmp_path):
    data, evals = make_data(), make_data(6, seed=9)
    settings = {"batch_size": 4, "micro_batch_size": 3, "seed": 3, "eval_data": evals}

    model, optimizer, scheduler = _setup()
    whole = bg.fit(
        model, mse, data, optimizer, epochs=2, scheduler=scheduler, progress=False, **settings
    )

    model_a, optimizer_a, scheduler_a = _setup()
    path = tmp_path / "history.json"
    bg.fit(
        model_a,
        mse,
        data,
        optimizer_a,
        scheduler=scheduler_a,
        history_path=path,
        progress=False,
        **first,
        **settings,
    )
    states = [m.state_dict() for m in (model_a, optimizer_a, scheduler_a)]
    model_b, optimizer_b, scheduler_b = _setup()
    for module, state in zip((model_b, optimizer_b, scheduler_b), states, strict=True):
        module.load_state_dict(state)
    before = bg.History.from_json(path)
    resumed = bg.fit(
        model_b,
        mse,
        data,
        optimizer_b,
        epochs=1,
        scheduler=scheduler_b,
        history=before,
        progress=False,
        **settings,
    )

    assert rel_err(params(model_b), params(model)) <= 1e-10
    for field in ("step", "epoch", "samples_seen", "batch_size", "lr"):
        assert [getattr(r, field) for r in resumed.steps] == [
            getattr(r, field) for r in whole.steps
        ]
    assert [r.loss for r in resumed.steps] == pytest.approx(
        [r.loss for r in whole.steps], rel=1e-12
    )
    assert (resumed.step, resumed.epoch, resumed.samples_seen) == (6, 2.0, 20)
    assert resumed.wall_time >= before.wall_time
    assert len(before.steps) == first.get("steps", 3)  # the history passed in is not changed
    if "epochs" in first:
        assert [(e.step, e.epoch) for e in resumed.evals] == [(3, 1.0), (6, 2.0)]
        assert [e.loss for e in resumed.evals] == pytest.approx([e.loss for e in whole.evals])


def test_history_json_round_trip_keeps_non_finite_values(tmp_path):
    history = run(
        make_model(), make_data(96), batch_size=32, micro_batch_size=8, epochs=1, noise=True
    )
    history.steps[0] = bg.StepRecord(**{**vars(history.steps[0]), "b_simple": math.inf})
    loaded = bg.History.from_json(history.to_json(tmp_path / "h.json"))
    assert loaded == history
    assert json.loads((tmp_path / "h.json").read_text())["steps"][0]["b_simple"] == "inf"


def test_history_is_on_disk_when_training_fails(tmp_path):
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 5:  # the second step of the second epoch
            raise RuntimeError("out of memory, say")
        return mse(model, batch)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "history.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        bg.fit(
            model,
            failing,
            make_data(),
            optimizer,
            batch_size=4,
            epochs=3,
            history_path=path,
            progress=False,
        )
    saved = bg.History.from_json(path)
    assert [r.step for r in saved.steps] == [1, 2, 3, 4]
    assert (saved.epoch_index, saved.epoch_offset) == (1, 4)


# ---- noise scale, evaluation, progress -------------------------------------------------


def test_noise_scale_is_recorded_with_two_or_more_micro_batches():
    scale = bg.NoiseScale()
    history = run(
        make_model(), make_data(96), batch_size=32, micro_batch_size=8, epochs=2, noise=scale
    )
    assert scale.steps == 6
    assert all(r.b_simple is not None and math.isfinite(r.b_simple) for r in history.steps)
    # single-step estimates are unbiased but noisy (one may be negative); the average
    assert all(math.isfinite(r.grad_sq) and math.isfinite(r.trace_cov) for r in history.steps)
    assert history.steps[-1].grad_sq > 0
    assert history.steps[-1].trace_cov > 0
    assert history.steps[-1].b_simple == pytest.approx(scale.b_simple)
    assert history.noise_state == scale.state_dict()

    one_micro_batch = run(make_model(), make_data(), batch_size="full", epochs=1, noise=True)
    assert one_micro_batch.steps[0].b_simple is None


def test_evaluation_each_epoch_or_every_few_steps_with_accuracy():
    (x, y), test = digits()
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    modes = []

    def ce(model, batch):
        inputs, labels = batch
        modes.append(model.training)
        return bg.Loss.from_criterion(nn.CrossEntropyLoss(), model(inputs), labels)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    history = bg.fit(
        model,
        ce,
        (x, y),
        optimizer,
        batch_size=64,
        epochs=3,
        eval_data=test,
        metrics={"accuracy": "accuracy"},
        progress=False,
    )
    steps_per_epoch = math.ceil(len(y) / 64)
    assert [e.step for e in history.evals] == [steps_per_epoch * k for k in (1, 2, 3)]
    assert [e.epoch for e in history.evals] == [1.0, 2.0, 3.0]
    assert history.evals[-1].metrics["accuracy"] > 0.9
    assert history.evals[-1].loss < history.evals[0].loss
    assert False in modes  # evaluated in evaluation mode
    assert model.training  # and put back

    history = bg.fit(
        model,
        ce,
        (x, y),
        optimizer,
        batch_size=64,
        steps=25,
        eval_data=test,
        eval_every=10,
        history=history,
        progress=False,
    )
    assert [e.step for e in history.evals[3:]] == [70, 80, 90, 94]  # and the last step


def test_progress_bar_runs(capsys):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bg.fit(model, mse, make_data(), optimizer, batch_size=4, epochs=1)
    assert "loss" in capsys.readouterr().out


# ---- several processes -----------------------------------------------------------------


def _train(model, trained=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = bg.fit(
        model if trained is None else trained,
        mse,
        make_data(),
        optimizer,
        batch_size=3,  # ranks hold 2 + 1 samples, and 1 + 0 in the last batch
        micro_batch_size=1,
        epochs=2,
        seed=4,
        eval_data=make_data(5, seed=2),
        progress=False,
    )
    return params(model), history


def _fit_on_ranks():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    results = {"plain": _train(make_model())}
    model = make_model()
    results["ddp"] = _train(model, DistributedDataParallel(model))
    try:  # noise= is single-process only: every rank says so
        run(model, make_data(), batch_size=3, epochs=1, noise=True)
    except bg.ConfigError as error:
        results["refused"] = str(error)
    try:  # ranks that would draw other batches
        run(model, make_data(), batch_size=3, epochs=1, seed=dist.get_rank())
    except bg.ConfigError as error:
        results["disagree"] = str(error)
    try:  # bad settings on one rank stop every rank
        run(model, make_data(), batch_size=3 - 3 * dist.get_rank(), epochs=1)
    except bg.ConfigError as error:
        results["bad"] = str(error)
    return dist.get_rank(), results


def test_two_processes_follow_the_single_process_trajectory():
    ranks = launch(_fit_on_ranks, 2, timeout=120)

    expected, alone = _train(make_model())
    for rank, (reported_rank, results) in enumerate(ranks):
        assert reported_rank == rank
        assert "single process" in results["refused"]
        assert (
            "Rank 1 called fit with other settings than rank 0: seed=1 (rank 0: 0)"
            in (results["disagree"])
        )
        for wrap in ("plain", "ddp"):
            got, history = results[wrap]
            assert rel_err(got, expected) <= 1e-10, wrap
            assert [r.loss for r in history.steps] == pytest.approx([r.loss for r in alone.steps])
            assert [r.batch_size for r in history.steps] == [3, 3, 3, 1] * 2
            assert [r.samples_seen for r in history.steps] == [r.samples_seen for r in alone.steps]
            assert [r.epoch for r in history.steps] == [r.epoch for r in alone.steps]
            assert [e.loss for e in history.evals] == pytest.approx([e.loss for e in alone.evals])
            assert history.config["world_size"] == 2


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": -4}, "batch_size must be at least 1"),
        ({"batch_size": True}, "batch_size must be a positive int"),
        ({"batch_size": "all"}, r"or 'full'"),
        ({"batch_size": 2.0}, "batch_size must be a positive int"),
        ({"batch_size": 11}, r"larger than the data set \(10 samples\); use batch_size='full'"),
        ({"epochs": None}, "Give epochs= .* or steps="),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": None, "steps": -1}, "steps must be at least 1"),
        ({"micro_batch_size": 0}, "micro_batch_size must be at least 1"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"noise": "yes"}, "noise must be True, False or a bg.NoiseScale"),
        ({"eval_every": 5}, "need eval_data="),
        ({"eval_data": make_data(), "metrics": {"acc": 1}}, r"metrics\['acc'\] must be"),
        ({"eval_data": make_data(), "eval_every": 0}, "eval_every must be at least 1"),
        ({"history": {"step": 3}}, "history must be a bg.History"),
    ],
)
def test_bad_settings_are_refused_before_any_step(kwargs, match):
    model = make_model()
    before = params(model)
    with pytest.raises(bg.ConfigError, match=match):
        run(model, make_data(), **{"batch_size": 4, "epochs": 1, **kwargs})
    assert rel_err(params(model), before) == 0


def test_bad_data_sets_are_refused():
    empty = (torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 1, dtype=torch.float64))
    with pytest.raises(bg.ConfigError, match="data holds no samples"):
        run(make_model(), empty, batch_size="full", epochs=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*make_data()))
    with pytest.raises(bg.ConfigError, match="a DataLoader cannot be passed"):
        run(make_model(), loader, batch_size=4, epochs=1)
    with pytest.raises(bg.ConfigError, match="eval_data holds no samples"):
        run(make_model(), make_data(), batch_size=4, epochs=1, eval_data=empty)


def test_plateau_scheduler_is_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(bg.ConfigError, match="ReduceLROnPlateau steps on a metric"):
        bg.fit(model, mse, make_data(), optimizer, batch_size=4, epochs=1, scheduler=plateau)


def test_resuming_mid_epoch_needs_the_same_order():
    history = run(make_model(), make_data(), batch_size=4, steps=1, seed=1)
    with pytest.raises(bg.ConfigError, match=r"middle of epoch 0 .*seed: 1 -> 2"):
        run(make_model(), make_data(), batch_size=4, epochs=1, seed=2, history=history)
    with pytest.raises(bg.ConfigError, match="dataset_size: 10 -> 12"):
        run(make_model(), make_data(12), batch_size=4, epochs=1, seed=1, history=history)
    at_boundary = run(make_model(), make_data(), batch_size=4, epochs=1, seed=1)
    run(make_model(), make_data(12), batch_size=5, epochs=1, history=at_boundary)  # fine


def test_history_from_another_format_is_refused():
    with pytest.raises(bg.ConfigError, match="another version"):
        bg.History.from_dict({"version": 0})


def test_the_history_file_survives_a_kill_while_it_is_written(tmp_path):
    """A process killed half-way through writing a new history (by the signal for
    exceeding its file-size limit, so at a known point, not a race) leaves the
    previous history on disk whole; written in place, the file would be cut short."""
    path = tmp_path / "history.json"
    row = bg.StepRecord(1, 0.5, 1, 1, 1, 0.25, 1.5, 0.1, 0.01)
    bg.History(steps=[row], step=1).to_json(path)
    script = (
        "import resource, signal, batchgrad as bg\n"
        "row = bg.StepRecord(1, 0.5, 1, 1, 1, 0.25, 1.5, 0.1, 0.01)\n"
        "history = bg.History(steps=[row] * 20000, step=20000)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))\n"
        f"history.to_json({str(path)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120, check=False)
    assert done.returncode == -signal.SIGXFSZ  # killed inside the write
    restored = bg.History.from_json(path)  # loads: the kill left the old file whole
    assert restored.step == 1


def test_a_failed_history_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    model, data = make_model(), make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = bg.fit(model, mse, data, optimizer, batch_size=4, epochs=1, progress=False)
    history.to_json(path)
    before = path.read_bytes()

    def crash(*args):
        raise KeyboardInterrupt  # killed between writing the new content and the rename

    monkeypatch.setattr(os, "replace", crash)
    more = bg.fit(
        model, mse, data, optimizer, batch_size=4, epochs=1, history=history, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        more.to_json(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]
