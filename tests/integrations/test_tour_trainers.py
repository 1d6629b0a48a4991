"""The tour's Trainer chapter: the audit on tiny GPT-2 and BERT."""

import pytest

pytest.importorskip("transformers")

from batchgrad._tour import run_tour


def test_trainers_chapter_audits_gpt2_and_bert(tmp_path):
    answers = run_tour(tmp_path, only=["trainers"])
    gpt2, bert = answers["trainers"].data["audits"]
    assert gpt2["model"] == "GPT2LMHeadModel"
    # the token-count ratio: one label per row counted before the shift
    assert gpt2["stock_count"] == gpt2["count"] + 10
    assert gpt2["scale"] == pytest.approx(gpt2["count"] / gpt2["stock_count"], rel=1e-5)
    assert gpt2["cosine"] == pytest.approx(1, abs=1e-6)
    # about the number of micro-batches, and off in direction (4, 4, 2 rows)
    assert bert["model"] == "BertForSequenceClassification"
    assert 2 < bert["scale"] < 4
    assert bert["cosine"] < 0.999
    report = (tmp_path / "report.md").read_text()
    assert "The Hugging Face Trainer's step, audited" in report
    assert "ignores num_items_in_batch" in report
