"""The integration benchmark runs end to end (tiny sizes); its timings are never asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lightning")

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


@pytest.mark.filterwarnings("ignore")  # Lightning's advice on data-loader workers
def test_integration_overhead_quick_run_writes_every_row(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "integration_overhead", BENCHMARKS / "integration_overhead.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / "x.json"
        assert module.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    results = json.loads(out.read_text())
    assert [row["integration"] for row in results["rows"]] == [
        "transformers",
        "lightning",
        "accelerate",
    ]
    for row in results["rows"]:
        assert len(row["ratio_per_round"]) == 1
        # 3 steps, the first dropped
        assert len(row["stock_steps_ms"]) == len(row["batchgrad_steps_ms"]) == 2
        assert row["ratio"] > 0
    direct = results["transformers_window_direct"]
    assert direct["ratio"] > 0
    assert len(direct["stock"]["times_ms"]) == len(direct["batchgrad"]["times_ms"]) >= 10
