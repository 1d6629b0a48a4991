"""Data-parallel accumulation with real gloo processes on 127.0.0.1.

Each world size is launched once (bounded by a timeout) and runs every scenario;
the parent compares each rank's gradient with one process on the whole batch.
"""

import datetime
import itertools
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import batchgrad as bg
from batchgrad._distributed import _free_port, _loopback_store, launch
from tests import distributed_faults as faults
from tests.cases import CASES, reference_grads, rel_err

CASE = {case.id: case for case in CASES}
N = 12

# (id, case, shard bounds per rank, micro_batch_size, reduction, wrap)
SCENARIOS = {
    2: [
        ("even-ddp", "mlp-ce-ignore", [(0, 6), (6, 12)], 2, "mean", "ddp"),
        # every label counted: N(B) is presumed right from each rank's first micro-batch
        ("all-counted-ddp", "cnn-ce", [(0, 6), (6, 12)], 4, "mean", "ddp"),
        ("all-counted-plain", "cnn-ce", [(0, 6), (6, 12)], 4, "mean", "plain"),
        ("uneven-ddp", "mlp-ce-ignore", [(0, 3), (3, 12)], 2, "mean", "ddp"),
        ("uneven-plain", "mlp-ce-ignore", [(0, 3), (3, 12)], 2, "mean", "plain"),
        ("uneven-sum-ddp", "mlp-mse-mask", [(0, 5), (5, 12)], 3, "sum", "ddp"),
        ("empty-rank-ddp", "mlp-ce-ignore", [(0, 0), (0, 12)], 5, "mean", "ddp"),
        ("empty-rank-plain", "mlp-mse-mask", [(0, 12), (12, 12)], 5, "mean", "plain"),
        ("tokens-ddp", "lm-padded", [(0, 4), (4, 12)], 3, "mean", "ddp"),
        ("tokens-plain-sum", "lm-padded", [(0, 7), (7, 12)], 2, "sum", "plain"),
        ("ready-made-ddp", "mlp-ce-ignore", [(0, 5), (5, 12)], None, "mean", "ddp"),
    ],
    3: [
        ("uneven-ddp", "mlp-ce-ignore", [(0, 2), (2, 7), (7, 12)], 2, "mean", "ddp"),
        ("uneven-plain", "lm-padded", [(0, 5), (5, 6), (6, 12)], 2, "mean", "plain"),
        ("empty-rank-ddp", "mlp-mse-mask", [(0, 6), (6, 6), (6, 12)], 4, "sum", "ddp"),
    ],
}


def _run_scenarios(scenarios):
    rank = dist.get_rank()
    grads = {}
    for name, case_id, shards, size, reduction, wrap in scenarios:
        case = CASE[case_id]
        model, batch = case.build(N, torch.float64, seed=7)
        start, stop = shards[rank]
        local = bg._split.slice_batch(batch, start, stop)
        if size is None:  # ready-made micro-batches of uneven sizes
            cuts = [*range(start, stop, 3), stop]
            local = iter([bg._split.slice_batch(batch, a, b) for a, b in itertools.pairwise(cuts)])
        wrapped = DistributedDataParallel(model) if wrap == "ddp" else model
        # Twice: the second call's agreement rides in the gradient all-reduce.
        for suffix in ("", "-in-sum"):
            if size is None:
                local = iter(
                    [bg._split.slice_batch(batch, a, b) for a, b in itertools.pairwise(cuts)]
                )
            model.zero_grad(set_to_none=True)
            report = bg.accumulate(
                wrapped, case.loss_fn, local, micro_batch_size=size, reduction=reduction
            )
            grads[name + suffix] = (
                [p.grad.clone() for p in model.parameters()],
                report.loss,
                report.count,
                report.world_size,
                report.micro_batches,
                len(report.micro_batch_counts),
                report.grad_norm,
            )
    return {
        "scenarios": grads,
        "faults": faults.fault_matrix(),
        "ddp": faults.ddp_configurations(),
        "mismatches": faults.mismatches(),
        "dp": faults.dp_sgd_and_noise(),
        "fused": faults.fused_agreement(),
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def world(request):
    nproc = request.param
    return nproc, launch(_run_scenarios, nproc, SCENARIOS[nproc], timeout=180)


def test_every_scenario_equals_one_process_on_the_whole_batch(world):
    nproc, results = world
    for name, case_id, _, _, reduction, _ in SCENARIOS[nproc]:
        case = CASE[case_id]
        model, batch = case.build(N, torch.float64, seed=7)
        expected = reference_grads(case, model, batch, reduction)
        expected_loss = float(case.reference(model, batch, reduction).detach())
        expected_count = float(case.loss_fn(model, batch).count)
        expected_norm = sum(float(g.square().sum()) for g in expected) ** 0.5
        everyone = sum(results[rank]["scenarios"][name][5] for rank in range(nproc))
        for rank, call in itertools.product(range(nproc), (name, f"{name}-in-sum")):
            grads, loss, count, world_size, micro, _, norm = results[rank]["scenarios"][call]
            assert rel_err(grads, expected) <= 1e-10, (call, rank)
            assert loss == pytest.approx(expected_loss, rel=1e-10), (call, rank)
            assert count == expected_count
            assert world_size == nproc
            assert micro == everyone  # the micro-batches of every rank
            assert norm == pytest.approx(expected_norm, rel=1e-10)


# ---- the fault matrix: every point × failing rank × exception × wrapper ----------


def test_a_failure_anywhere_raises_on_every_rank_keeps_gradients_and_the_next_call_works(world):
    nproc, results = world
    seen = 0
    for wrap, agreed in itertools.product(("ddp", "plain"), ("first", "cached")):
        for point, kinds, error, text in faults.POINTS:
            for failing in sorted({0, nproc - 1}):
                for kind in kinds:
                    name = f"{wrap}-{agreed}-{point}-rank{failing}-"
                    name += kind.__name__ if kind else "input"
                    for rank in range(nproc):
                        got, message, kept, after, cached = results[rank]["faults"][name]
                        assert got == error, (name, rank, message)
                        assert message.startswith(f"On rank {failing}"), (name, rank, message)
                        assert re.search(text, message), (name, rank, message)
                        assert kept, (name, rank)
                        assert after <= 1e-10, (name, rank, after)
                        # "cached": the agreement rode in the gradient all-reduce
                        assert cached == (agreed == "cached"), (name, rank)
                    seen += 1
    assert seen == 2 * 2 * 2 * sum(len(kinds) for _, kinds, _, _ in faults.POINTS)


# ---- the agreement inside the gradient all-reduce ----------------------------------


@pytest.mark.parametrize(
    ("case", "error", "text", "cached"),
    [
        ("first", None, "", False),
        ("cached", None, "", True),
        # the agreed layout is every rank's but the last's (which froze a parameter)
        ("frozen-on-one-rank", "ConfigError", r"rank 0 has 4, rank \d has 3", "but-last"),
        ("after-frozen", None, "", False),
        ("after-frozen-cached", None, "", True),
        ("frozen-everywhere", None, "", False),
        ("frozen-everywhere-cached", None, "", True),
        ("unfrozen", None, "", False),
        ("settings", "ConfigError", r"reduction: rank 0: 'mean', .*: 'sum'", True),
        ("after-settings", None, "", True),
        ("after-settings-cached", None, "", True),
        ("failure", "NonFiniteError", r"^On rank \d: The loss of micro-batch 0 is nan", True),
        ("after-failure", None, "", True),
        ("other-model", None, "", False),
        ("other-model-cached", None, "", True),
        ("back-to-first-layout", None, "", False),
        ("same-layout-other-model", None, "", True),
        ("float32-first", None, "", False),
        ("float32-cached", None, "", True),
    ],
)
def test_the_agreement_in_the_gradient_sum_falls_back_raises_and_recovers_on_every_rank(
    world, case, error, text, cached
):
    nproc, results = world
    for rank in range(nproc):
        got, message, kept, rel, was_cached = results[rank]["fused"][case]
        assert was_cached == (rank < nproc - 1 if cached == "but-last" else cached), (case, rank)
        if error is None:
            assert got == "no error", (case, rank, message)
            assert rel <= (1e-5 if case.startswith("float32") else 1e-10), (case, rank, rel)
        else:
            assert got == error, (case, rank, message)
            assert re.search(text, message), (case, rank, message)
            assert kept, (case, rank)


def test_control_values_travel_exactly_in_a_float32_gradient_sum(world):
    nproc, results = world
    own = [results[rank]["fused"]["float32-report"][2] for rank in range(nproc)]
    count = sum(results[rank]["fused"]["float32-report"][3] for rank in range(nproc))
    for rank in range(nproc):
        loss, got_count, _, _ = results[rank]["fused"]["float32-report"]
        assert got_count == count
        assert loss == math.fsum(own) / count  # exactly: not rounded to float32


def test_parameters_no_rank_used_keep_none_inside_the_sum(world):
    nproc, results = world
    for rank in range(nproc):
        assert results[rank]["fused"]["unused-cached"] == [False, True, True, True]


# ---- DDP as users configure it ---------------------------------------------------


@pytest.mark.parametrize("config", ["bucket-view", "find-unused", "comm-hook", "buffers"])
@pytest.mark.parametrize("split", ["uneven", "idle"])
def test_ddp_configurations_are_exact_under_uneven_and_idle_ranks(world, config, split):
    nproc, results = world
    for rank in range(nproc):
        error, count, world_size = results[rank]["ddp"][f"{config}-{split}"]
        assert error <= 1e-10, (rank, error)
        assert count == 4 * nproc + 3
        assert world_size == nproc


@pytest.mark.parametrize("split", ["uneven", "idle"])
def test_a_comm_hook_runs_once_per_call_on_every_rank(world, split):
    nproc, results = world
    for rank in range(nproc):
        assert results[rank]["ddp"][f"comm-hook-calls-{split}"] == 2  # two calls, one bucket


def test_gradient_as_bucket_view_adds_once_and_a_failure_keeps_the_old_gradient(world):
    nproc, results = world
    for rank in range(nproc):
        added, failed, same = results[rank]["ddp"]["bucket-view-add"]
        assert added <= 1e-10
        assert failed == "NonFiniteError"
        assert same


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
@pytest.mark.parametrize("split", ["uneven", "idle"])
def test_parameters_no_rank_used_keep_none(world, wrap, split):
    nproc, results = world
    for rank in range(nproc):
        none, sometimes, error = results[rank]["ddp"][f"unused-{wrap}-{split}"]
        assert none, rank
        assert sometimes, rank
        assert error <= 1e-10, rank


def test_static_graph_is_refused_with_the_reason(world):
    nproc, results = world
    for rank in range(nproc):
        kind, text = results[rank]["ddp"]["static-graph"]
        assert kind == "ConfigError"
        assert "static_graph=True" in text
        assert "build the model without static_graph" in text


# ---- ranks that disagree -----------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("reduction", r"reduction: rank 0: 'mean', .*rank \d: 'sum'"),
        ("existing-grad", r"existing_grad: rank 0: 'replace', .*: 'add'"),
        ("clip", r"clip_per_sample: rank 0: 1.0, .*: 2.0"),
        ("shapes", r"rank 0 has \['w:\(2, 3\):torch.float64'\], rank \d has \['w:\(3, 2\)"),
        ("trainable", r"rank 0 has 4, rank \d has 3 \(rank 0 only: \['2.bias"),
    ],
)
def test_ranks_that_disagree_raise_config_error_on_every_rank(world, case, message):
    nproc, results = world
    for rank in range(nproc):
        kind, text = results[rank]["mismatches"][case]
        assert kind == "ConfigError", (rank, text)
        assert re.search(message, text), (rank, text)


def test_the_same_model_works_after_a_disagreement(world):
    nproc, results = world
    for rank in range(nproc):
        assert results[rank]["mismatches"]["after"] == ("no error", "")


# ---- DP-SGD and the noise scale across ranks -------------------------------------


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dp_sgd_across_ranks_equals_one_process_with_the_same_generator(world, wrap, reduction):
    nproc, results = world
    grads0 = results[0]["dp"][f"dp-sgd-{wrap}-{reduction}"][1]
    for rank in range(nproc):
        error, grads, clipped, one_clipped, loss, one_loss, norm, one_norm = results[rank]["dp"][
            f"dp-sgd-{wrap}-{reduction}"
        ]
        assert error <= 1e-10, (rank, error)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads0, strict=True))  # noise: once
        assert clipped == one_clipped
        assert 0 < clipped < 1  # some samples clipped, some not
        assert loss == pytest.approx(one_loss, rel=1e-10)
        assert norm == pytest.approx(one_norm, rel=1e-10)


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_noise_scale_across_ranks_uses_the_ranks_shares_as_small_batches(world, wrap):
    nproc, results = world
    for rank in range(nproc):
        got, expected = results[rank]["dp"][f"noise-{wrap}"]
        for field in ("grad_sq", "trace_cov", "b_simple", "small_batch", "big_batch"):
            assert getattr(got, field) == pytest.approx(getattr(expected, field), rel=1e-10)


# ---- one synchronisation per logical batch ----------------------------------------


def _count_synchronisations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ddp = DistributedDataParallel(model)
    hook_calls = []

    def counting_hook(state, bucket):
        hook_calls.append(bucket.index())
        return allreduce_hook(dist.group.WORLD, bucket)

    ddp.register_comm_hook(None, counting_hook)
    x = torch.randn(10 + 3 * dist.get_rank(), 4)  # ranks hold 10 and 13 samples
    ddp(x).sum().backward()  # one plain synchronised step: how many buckets per sync
    per_sync = len(hook_calls)
    model.zero_grad(set_to_none=True)

    def loss_fn(model, x):
        return bg.Loss.from_values(model(x).square())

    counts = []
    for _ in range(3):  # three logical batches, 4 and 5 micro-batches per rank
        hook_calls.clear()
        model.zero_grad(set_to_none=True)
        bg.accumulate(ddp, loss_fn, x, micro_batch_size=3)
        counts.append(len(hook_calls))

    # An unwrapped model: count every all-reduce this process issues.
    all_reduces = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        all_reduces.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        for _ in range(2):  # the first call on the group, then one after its agreement
            model.zero_grad(set_to_none=True)
            bg.accumulate(model, loss_fn, x, micro_batch_size=3)
    finally:
        dist.all_reduce = original
    return per_sync, counts, all_reduces


def test_ddp_synchronises_once_per_logical_batch():
    for per_sync, counts, all_reduces in launch(_count_synchronisations, 2, timeout=120):
        assert per_sync >= 1
        assert counts == [per_sync] * 3  # not one sync per micro-batch
        # Unwrapped, first call: one control all-reduce (a header and a block per
        # rank) and one gradient all-reduce (and a flag per parameter: has it a
        # gradient?). Then one: gradients, flags and per rank 16 control values,
        # each as 4 float32 (a mantissa in three parts and an exponent).
        n_params = 4 * 8 + 8 + 8 * 2 + 2
        assert all_reduces == [6 + 8 * 2, n_params + 4, n_params + 4 + 2 * 16 * 4]


# ---- bad input on one rank: every rank raises, nothing hangs, gradients kept -------


def _square_loss(model, batch):
    return bg.Loss.from_values(model(batch).square())


def _bad_inputs():
    rank = dist.get_rank()
    outcomes = {}

    def attempt(name, wrap, make_batch, loss_fn=_square_loss, **kwargs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        module = DistributedDataParallel(model) if wrap else model
        model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
        before = [p.grad.clone() for p in model.parameters()]
        try:
            bg.accumulate(module, loss_fn, make_batch(rank), existing_grad="replace", **kwargs)
            outcomes[name] = ("no error", "", True)
        except Exception as error:
            kept = all(
                torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True)
            )
            outcomes[name] = (type(error).__name__, str(error), kept)

    def nan_on_rank_1(rank):
        x = torch.randn(6, 3, dtype=torch.float64)
        if rank == 1:
            x[3, 0] = math.nan
        return x

    def mismatch_on_rank_0(rank):
        rows = 5 if rank == 0 else 6
        return (torch.randn(6, 3, dtype=torch.float64), torch.randn(rows, 1))

    def fails_on_rank_1(model, batch):
        if dist.get_rank() == 1:
            raise RuntimeError("a bug in the user's loss on rank 1")
        return _square_loss(model, batch)

    def no_units(model, batch):
        return bg.Loss.from_values(model(batch), torch.zeros(len(batch), 1, dtype=torch.bool))

    def sqrt_at_zero_on_rank_1(model, batch):
        # A finite loss whose gradient is infinite: d/dz sqrt(z) at z = 0, on rank 1's
        # second micro-batch only.
        out = model(batch)
        total = out.square().sum()
        if dist.get_rank() == 1 and batch[0, 0] == second_micro_batch_marker:
            total = total + (out * 0).square().sum().sqrt()
        return bg.Loss(total, len(batch))

    second_micro_batch_marker = 7.0

    def two_rows(rank):
        x = torch.randn(6, 3, dtype=torch.float64)
        x[2, 0] = second_micro_batch_marker
        return x

    for wrap in (True, False):
        tag = "ddp" if wrap else "plain"
        attempt(f"nan-{tag}", wrap, nan_on_rank_1, micro_batch_size=2)
        attempt(
            f"mismatch-{tag}",
            wrap,
            mismatch_on_rank_0,
            loss_fn=lambda m, b: _square_loss(m, b[0]),
            micro_batch_size=2,
        )
        attempt(f"user-error-{tag}", wrap, two_rows, loss_fn=fails_on_rank_1, micro_batch_size=4)
        attempt(f"zero-count-{tag}", wrap, two_rows, loss_fn=no_units, micro_batch_size=4)
        attempt(f"all-empty-{tag}", wrap, lambda rank: torch.zeros(0, 3, dtype=torch.float64))
        attempt(
            f"inf-grad-{tag}", wrap, two_rows, loss_fn=sqrt_at_zero_on_rank_1, micro_batch_size=2
        )

    # Stale gradients on rank 0 only: refused before any micro-batch, on every rank.
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    if rank == 0:
        model.weight.grad = torch.ones_like(model.weight)
    kept = model.weight.grad
    try:
        bg.accumulate(DistributedDataParallel(model), _square_loss, two_rows(rank))
        outcomes["stale-grad"] = ("no error", "", True)
    except bg.BatchError as error:
        outcomes["stale-grad"] = (type(error).__name__, str(error), model.weight.grad is kept)

    # A group other than the one the DDP model synchronises over.
    try:
        bg.accumulate(
            DistributedDataParallel(model),
            _square_loss,
            two_rows(rank),
            group=dist.new_group([0, 1]),
        )
        outcomes["other-group"] = ("no error", "")
    except bg.BatchError as error:
        outcomes["other-group"] = (type(error).__name__, str(error))

    from torch.distributed.fsdp import fully_shard

    sharded = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    fully_shard(sharded[0])
    try:
        bg.accumulate(sharded, _square_loss, torch.randn(4, 3), micro_batch_size=2)
        outcomes["fsdp"] = ("no error", "")
    except bg.BatchError as error:
        outcomes["fsdp"] = (type(error).__name__, str(error))
    return outcomes


BAD = [
    ("nan", ["NonFiniteError"] * 2, r"On rank 1: The loss of micro-batch 1 is nan"),
    ("mismatch", ["BatchShapeError"] * 2, r"On rank 0: Tensors in the batch disagree.*has 5"),
    ("user-error", ["DistributedError"] * 2, r"On rank 1, micro-batch 0: RuntimeError: a bug"),
    ("zero-count", ["ZeroCountError"] * 2, r"0 units over all 2 ranks"),
    ("all-empty", ["EmptyBatchError"] * 2, r"Every one of the 2 ranks has an empty batch"),
    ("inf-grad", ["NonFiniteError"] * 2, r"On rank 1: The gradient of .* in micro-batch 1,"),
]


@pytest.fixture(scope="module")
def bad_outcomes():
    return launch(_bad_inputs, 2, timeout=180)


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
@pytest.mark.parametrize(("name", "types", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_on_one_rank_raises_on_every_rank(bad_outcomes, wrap, name, types, message):
    for rank, outcomes in enumerate(bad_outcomes):
        kind, text, kept = outcomes[f"{name}-{wrap}"]
        assert kind == types[rank], (rank, text)
        assert re.search(message, text), (rank, text)
        assert kept, rank


def test_fsdp_without_a_sharded_root_is_refused_with_the_reason(bad_outcomes):
    for outcomes in bad_outcomes:
        kind, text = outcomes["fsdp"]
        assert kind == "ConfigError"
        assert re.search(
            r"0 is sharded with fully_shard \(FSDPLinear\) but the model itself is not", text
        )


def test_stale_gradients_on_one_rank_are_refused_on_every_rank(bad_outcomes):
    for outcomes in bad_outcomes:
        kind, text, kept = outcomes["stale-grad"]
        assert kind == "ExistingGradError"
        assert re.search(
            r"On rank 0: 1 parameter\(s\) already hold non-zero gradients \(weight\)", text
        )
        assert kept


def test_a_group_other_than_the_ddp_models_is_refused(bad_outcomes):
    for outcomes in bad_outcomes:
        kind, text = outcomes["other-group"]
        assert kind == "ConfigError"
        assert "differs from the process group" in text


def test_group_without_distributed_is_refused():
    with pytest.raises(bg.ConfigError, match="not initialised"):
        bg.accumulate(nn.Linear(1, 1), _square_loss, torch.ones(2, 1), group=object())


def _failing():
    raise ValueError("boom")


def _sleep():
    import time

    time.sleep(120)


def test_launch_stops_processes_that_outlive_the_timeout():
    with pytest.raises(bg.DistributedError, match=r"2 of 2 processes did not finish within 5 s"):
        launch(_sleep, 2, timeout=5)


def test_launch_reports_a_failing_process():
    with pytest.raises(bg.DistributedError, match="ValueError: boom"):
        launch(_failing, 2, timeout=60)


def _dies(wrap):
    return faults.a_rank_dies(wrap)


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_a_rank_that_dies_gives_the_others_a_distributed_error_at_once(wrap):
    results = launch(_dies, 2, wrap, timeout=60, may_die=(1,))
    assert results[1] is None
    kind, text, cause = results[0]
    assert kind == "DistributedError"
    assert "could not reach the other ranks" in text
    assert "Restart the job" in text
    # The connection closing ended the wait, not the process group's timeout (which is
    # launch's 60 s: had the survivor waited for it, launch itself would have failed).
    assert cause
    assert "timed out" not in cause.lower()
    assert "timeout" not in cause.lower()


def _listening(port):
    """The local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
def test_the_rendezvous_listens_on_the_loopback_interface_only():
    port = _free_port()
    store = _loopback_store(("127.0.0.1", port), 0, 1, datetime.timedelta(seconds=10))
    store.set("key", "value")
    assert store.get("key") == b"value"
    assert _listening(port) == ["0100007F"]  # 127.0.0.1 (a plain TCPStore: 0.0.0.0)


def test_control_values_encode_exactly_in_float32_and_refuse_what_they_cannot():
    import random

    from batchgrad._protocol import _decode, _encode

    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-300, 300) for _ in range(600)]
    values += [0.0, 1.0, 2.0**53 - 1, 5e-324, 1.7e308, 1e-40, 12345.678]
    encoded = _encode(values, torch.float32, 4)
    summed = encoded + torch.zeros_like(encoded)  # the other ranks' zeros
    assert _decode(summed, 4) == values
    assert _encode([1.0, math.inf], torch.float32, 4) is None
    assert _encode([math.nan], torch.float64, 1) is None
