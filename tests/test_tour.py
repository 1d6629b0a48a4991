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
