import itertools
import json
import math
import statistics
from pathlib import Path

from batchgrad._tour import run_tour


def test_accumulation_chapter_writes_its_report(tmp_path):
    answers = run_tour(tmp_path, only=["accumulation"])
    report = (tmp_path / "report.md").read_text()
    assert "## 1. Gradient accumulation that equals the big batch" in report
    assert "![accumulation_error](accumulation_error.png)" in report
    for name in ("accumulation_error.png", "accumulation_token_weights.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((tmp_path / "results.json").read_text())
    splits = results["chapters"]["accumulation"]["splits"]
    assert splits == answers["accumulation"].data["splits"]
    assert len(splits) == 12
    for row in splits:
        assert row["batchgrad_rel_err_float32"] <= 1e-5
        assert row["batchgrad_rel_err_float64"] <= 1e-10
        if row["micro_batches"] > 1:
            assert row["naive_rel_err"] > 1e-2

    # The README quotes these numbers.
    naive = [r["naive_rel_err"] for r in splits if r["micro_batches"] > 1]
    readme = _readme()
    assert f"{100 * min(naive):.1f}–{100 * max(naive):.0f}% off the whole-batch one" in readme
    assert "less than 1e-6 in float32 and 1e-15 in float64" in readme
    assert max(r["batchgrad_rel_err_float32"] for r in splits) < 1e-6
    assert max(r["batchgrad_rel_err_float64"] for r in splits) < 1e-15


def _readme():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return " ".join(text.split())


def test_precision_chapter_shows_the_float32_sum_at_one_rounding(tmp_path):
    answers = run_tour(tmp_path, only=["precision"])
    report = (tmp_path / "report.md").read_text()
    assert "Mixed precision: a float32 running sum" in report
    assert (tmp_path / "precision_running_sum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = answers["precision"].data["splits"]
    assert [r["micro_batches"] for r in rows] == [1, 4, 16, 64, 256]
    for row in rows:
        assert row["batchgrad_float32_sum"] <= 1.5 * row["one_rounding"]
    assert rows[-1]["autograd_bf16"] > 3 * rows[-1]["one_rounding"]
    assert rows[-1]["autograd_bf16"] > 2 * rows[1]["autograd_bf16"]  # grows with the count


def test_data_parallel_chapter_runs_two_processes(tmp_path):
    answers = run_tour(tmp_path, only=["data-parallel"])
    assert (tmp_path / "data_parallel_error.png").exists()
    rows = answers["data-parallel"].data["splits"]
    assert [r["micro_batches_per_rank"] for r in rows] == [1, 2, 4, 8]
    for row in rows:
        assert row["batchgrad_rel_err"] <= 1e-10
        assert row["naive_rel_err"] > 1e-2  # ranks hold different token counts


def test_bptt_chapter_measures_the_sum_over_time(tmp_path):
    answers = run_tour(tmp_path, only=["bptt"])
    report = (tmp_path / "report.md").read_text()
    assert "Backpropagation through time: summed over steps" in report
    for name in ("bptt_time_contributions.png", "bptt_truncation.png", "bptt_mean_vs_sum.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in report

    data = answers["bptt"].data
    results = json.loads((tmp_path / "results.json").read_text())["chapters"]["bptt"]
    assert results["mean_vs_sum"]["count"] == data["mean_vs_sum"]["count"]
    steps = data["task"]["steps"]
    assert set(data["cells"]) == {"rnn", "gru", "lstm", "lstm_open"}
    for cell in data["cells"].values():
        # The per-step terms add up to plain autograd's whole-sequence gradient.
        assert cell["contributions_sum_rel_err"] <= 1e-10
        assert len(cell["state_grad_norms"]) == steps
        # Chunked bptt is exact, whatever the chunk.
        assert [r["chunk"] for r in cell["chunked_bptt"]] == [1, 10, steps]
        for row in cell["chunked_bptt"]:
            assert row["rel_err"] <= 1e-10
        rows = {r["k1"]: r for r in cell["truncation"]}
        assert min(rows) == 1
        assert max(rows) == steps
        assert rows[steps]["rel_err"] <= 1e-10
        assert rows[1]["rel_err"] > 1e-3  # truncation misses the long dependency
        errors = [rows[k1]["rel_err"] for k1 in sorted(rows)]
        assert errors == sorted(errors, reverse=True)
        for k1, row in rows.items():
            # Loss at the last step only: tbptt(k1) is the sum of the last k1 terms ...
            assert row["last_k1_contributions_vs_tbptt"] <= 1e-10
            # ... and no window up to T/2 holds a marker: the marker weights get nothing.
            if k1 <= steps // 2:
                assert abs(row["marker_weights_rel_err"] - 1) <= 1e-10
    # Vanishing at the default initialisation, carried with the forget gate open.
    assert data["cells"]["rnn"]["state_grad_ratio"] < 1e-10
    assert data["cells"]["lstm_open"]["state_grad_ratio"] > 1e-2
    assert data["cells"]["lstm_open"]["truncation"][-2]["rel_err"] > 0.1

    rescaling = data["mean_vs_sum"]
    count = rescaling["count"]
    assert count == data["task"]["batch"] * steps
    assert rescaling["cosine"] >= 1 - 1e-12
    assert abs(rescaling["norm_ratio"] - count) <= 1e-10 * count
    runs = {r["run"]: r for r in rescaling["training"]}
    assert runs["SGD, sum, lr / N"]["param_rel_diff"][-1] <= 1e-10
    assert runs["SGD, sum, same lr"]["param_rel_diff"][0] > count / 2  # N times the step
    assert runs["Adam, sum, same lr"]["param_rel_diff"][-1] <= 0.1  # invariant up to eps
    assert runs["Adam, sum, same lr, eps × N"]["param_rel_diff"][-1] <= 1e-10


def test_summed_or_averaged_chapter_measures_per_sample_gradients(tmp_path):
    answers = run_tour(tmp_path, only=["summed-or-averaged"])
    report = (tmp_path / "report.md").read_text()
    assert "## 1. Per-sample gradients: summed, then maybe averaged" in report
    for name in ("per_sample_sum.png", "per_sample_batch_size.png", "per_sample_norms.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in report

    data = answers["summed-or-averaged"].data
    results = json.loads((tmp_path / "results.json").read_text())["chapters"]
    assert results["summed-or-averaged"]["one_batch"] == data["one_batch"]

    # The batch gradient is the sum of the per-sample gradients; "mean" divides it by B.
    one = data["one_batch"]
    batch = one["batch"]
    for key in (
        "per_sample_vs_loop",
        "accumulate_sum_vs_sum",
        "accumulate_mean_vs_mean",
        "autograd_sum_loss_vs_sum",
        "autograd_mean_loss_vs_mean",
        "projections_sum_vs_norm",
    ):
        assert one[key] <= 1e-10, key
    assert abs(one["sum_over_mean_norm"] - batch) <= 1e-10 * batch
    assert 0 < one["against_batch_gradient"] < batch
    assert one["sum_norm"] < one["sum_of_per_sample_norms"]

    # "sum" grows with B, "mean" does not (and tends to |E g|), as mu and Sigma predict.
    states = data["batch_size"]["states"]
    assert set(states) == {"init", "trained"}
    for state in states.values():
        rows = state["rows"]
        sizes = [r["batch"] for r in rows]
        assert sizes[0] == 1
        assert sizes[-1] >= 256
        assert all(r["batches"] >= 32 for r in rows)
        for r in rows:
            assert r["accumulate_rel_err"] <= 1e-10
            assert abs(r["sum_vs_predicted"]) <= 0.1
        sums = [r["sum_norm"] for r in rows]
        means = [r["mean_norm"] for r in rows]
        assert sums == sorted(sums)
        assert sums[-1] / sums[0] > 30  # at least like sqrt(1024), more once B >> B_noise
        assert max(means) / min(means) < 20
        assert means[-1] == min(means)
        # Above the noise scale the mean barely moves and is close to |mu|.
        above = [
            m for r, m in zip(rows, means, strict=True) if r["batch"] >= 4 * state["noise_scale"]
        ]
        assert above
        assert max(above) / min(above) < 1.5
        assert abs(means[-1] / state["mean_grad_norm"] - 1) < 0.1
        assert state["norms_vs_materialised"] <= 1e-10
    init = states["init"]
    assert init["rows"][-1]["sum_norm"] / init["rows"][0]["sum_norm"] > 100
    assert init["rows"][0]["mean_norm"] / init["rows"][-1]["mean_norm"] < 10
    assert states["trained"]["noise_scale"] > init["noise_scale"]
    assert states["trained"]["accuracy"] > init["accuracy"] + 0.3

    # lr_sum = lr_mean / B gives the same SGD step; Adam differs only through eps.
    step = data["one_step"]
    runs = {r["run"]: r for r in step["runs"]}
    assert runs["SGD, sum, lr / B"]["vs_mean_rel_diff"] <= 1e-10
    assert abs(runs["SGD, sum, same lr"]["vs_mean_rel_diff"] - (step["batch"] - 1)) <= 1e-6
    assert runs["Adam, sum, same lr"]["vs_mean_rel_diff"] <= 0.1
    assert runs["Adam, sum, same lr, ε × B"]["vs_mean_rel_diff"] <= 1e-10

    # Per-sample norms and clipping.
    clipping = data["clipping"]
    assert clipping["norms_vs_materialised"] <= 1e-10
    assert clipping["vs_reference"] <= 1e-10
    assert clipping["vs_exact_min"] <= 1e-5  # the 1e-6 in min(1, C / (|g_i| + 1e-6))
    assert clipping["clipped"] == clipping["clipped_reference"] == 0.5
    middle = sorted(clipping["norms"])[batch // 2 - 1 : batch // 2 + 1]
    assert abs(clipping["clip"] - sum(middle) / 2) <= 1e-12 * clipping["clip"]
    assert clipping["norm_ratio"] < 1
    assert max(clipping["norms"]) / min(clipping["norms"]) > 100


def test_batch_size_chapter_compares_regimes_and_measures_the_noise_scale(tmp_path):
    answers = run_tour(tmp_path, only=["batch-size"])
    report = (tmp_path / "report.md").read_text()
    assert "## 1. The batch in training: regimes and the critical batch size" in report
    for name in ("batch_size_regimes.png", "batch_size_critical.png", "batch_size_branched.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in report

    data = answers["batch-size"].data
    results = json.loads((tmp_path / "results.json").read_text())["chapters"]["batch-size"]
    assert results["critical"] == data["critical"]

    # The three regimes, the same number of epochs, from the same initial weights.
    runs = {r["regime"]: r for r in data["regimes"]["runs"]}
    assert set(runs) == {"stochastic", "mini-batch", "full-batch"}
    epochs = data["regimes"]["epochs"]
    assert runs["full-batch"]["steps"] == epochs
    assert runs["stochastic"]["steps"] == epochs * data["regimes"]["dataset_size"]
    assert len({r["curve"][0]["train_loss"] for r in runs.values()}) == 1
    size = data["regimes"]["dataset_size"]
    for run in runs.values():
        # the short last batch of each epoch is skipped
        assert run["samples_seen"] == epochs * (size // run["batch_size"] * run["batch_size"])
        end = [p["train_loss"] for p in run["curve"] if p["epoch"] > epochs - 0.5 - 1e-9]
        last = [p["train_loss"] for p in run["curve"] if p["epoch"] > epochs - 1 - 1e-9]
        assert run["iterate_train_loss"] == statistics.median(end)
        # the weights averaged over the last half epoch: within 1.25× of the epoch's best
        assert run["train_loss"] <= 1.25 * min(last)
        assert run["lr"] in [p["lr"] for p in run["sweep"] if not p["diverged"]]
        assert run["train_loss"] < run["curve"][0]["train_loss"]
        assert run["metrics"]["accuracy"] > 0.5

    # Steps to the target fall with the batch size, and level off.
    critical = data["critical"]
    sizes = [r["batch_size"] for r in critical["runs"]]
    steps = [r["steps"] for r in critical["runs"]]
    assert sizes[0] <= 4
    assert sizes[-1] >= 1024
    assert all(s is not None for s in steps)
    assert all(later <= 1.1 * earlier for earlier, later in itertools.pairwise(steps))
    assert steps[0] > 3 * steps[-1]
    assert steps[-1] / steps[-2] > 0.8  # the floor S_min
    samples = [r["samples"] for r in critical["runs"]]
    assert samples[-1] > 10 * samples[0]
    assert 0 < critical["s_min"] <= min(steps)
    assert sizes[0] < critical["b_noise"] < sizes[-1]

    # B_simple, measured on one run, lands near the B_noise fitted from all of them.
    advice = data["advice"]
    assert math.isfinite(advice["b_simple"])
    assert advice["b_simple"] > 0
    assert 0 < advice["b_simple_std"] < advice["b_simple"]
    assert critical["b_noise"] / 4 < advice["b_simple"] < 4 * critical["b_noise"]
    assert advice["batch_size"] == 2 ** round(math.log2(advice["b_simple"]))

    # The critical batch size measured by branching, next to B_simple, at each checkpoint.
    branched = data["branched"]
    assert [c["step"] for c in branched["checkpoints"]] == [0, 300]
    for checkpoint in branched["checkpoints"]:
        losses = {
            b["batch_size"]: b["loss"]
            for b in checkpoint["branches"]
            if isinstance(b["loss"], float) and math.isfinite(b["loss"])
        }
        best = min(losses.values())
        assert checkpoint["critical"] in losses
        assert losses[checkpoint["critical"]] <= 1.1 * best
        larger = [b for b in losses if b > checkpoint["critical"]]
        assert all(losses[b] > 1.1 * best for b in larger)
        assert best < checkpoint["start_loss"]
        assert math.isfinite(checkpoint["b_simple"])
    assert "B_crit" in report

    # The README quotes the noise scale and the fitted B_noise.
    quoted = f"B_simple is {advice['b_simple']:.0f} ± {advice['b_simple_std']:.0f}, against a "
    assert quoted + f"B_noise of {critical['b_noise']:.0f}" in _readme()
