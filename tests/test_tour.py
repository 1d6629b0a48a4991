import json

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
