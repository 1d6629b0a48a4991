"""Chapter: how far the Hugging Face Trainer's gradient is from the exact one.

`batchgrad.integrations.transformers.audit` on two tiny random-init models built
from configs (nothing downloaded): a GPT-2 language model and a BERT classifier,
trained on 10 right-padded rows of 2-12 tokens in micro-batches of 4, 4 and 2 rows
(``gradient_accumulation_steps=3``). Each audit runs one optimizer step with the
stock ``transformers.Trainer`` and one with batchgrad's from the same weights.
Needs the ``[transformers]`` extra; without it the chapter says so and skips.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Any

import torch

from .._report import Table, sci
from . import Answer, Chapter, Context

ROWS, LENGTH, VOCAB = 10, 12, 40
ACCUMULATION, MICRO_BATCH = 3, 4


def _model(name: str) -> Any:
    import transformers

    torch.manual_seed(0)
    if name == "GPT-2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_positions=LENGTH,
                n_embd=32,
                n_layer=2,
                n_head=2,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
            num_labels=3,  # type: ignore[call-arg]  # a PretrainedConfig keyword
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _rows(name: str) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows of 2..LENGTH tokens; labels -100 on the padding (LM)."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(ROWS):
        size = int(torch.randint(2, LENGTH + 1, (), generator=generator))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:size] = torch.randint(3, VOCAB, (size,), generator=generator)
        mask = (torch.arange(LENGTH) < size).long()
        labels = (
            torch.randint(0, 3, (), generator=generator)
            if name == "BERT"
            else torch.where(mask.bool(), ids, -100)
        )
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _audit(name: str, folder: str) -> dict[str, Any]:
    import transformers

    from ..integrations.transformers import audit

    args = transformers.TrainingArguments(
        output_dir=folder,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    setup = transformers.Trainer(model=_model(name), args=args, train_dataset=_rows(name))
    report = audit(setup)
    return {
        "model": type(setup.model).__name__,
        "rel_err": report.rel_err,
        "cosine": report.cosine,
        "scale": report.scale,
        "count": report.count,
        "stock_count": report.stock_count,
        "micro_batch_counts": list(report.micro_batch_counts),
        "reasons": list(report.reasons),
    }


def run(context: Context) -> Answer:
    if importlib.util.find_spec("transformers") is None:
        return Answer(
            "Skipped: this chapter needs the Hugging Face extra, "
            "`pip install 'batchgrad[transformers]'`.",
            data={"skipped": True},
        )
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(40)  # logging.ERROR
    try:
        with tempfile.TemporaryDirectory() as folder:
            rows = [_audit(name, folder) for name in context.track(["GPT-2", "BERT"], "auditing")]
    finally:
        transformers.logging.set_verbosity(verbosity)
    gpt2, bert = rows
    table = Table(
        f"One optimizer step, {ACCUMULATION} micro-batches of {MICRO_BATCH}, {MICRO_BATCH} and "
        f"{ROWS - 2 * MICRO_BATCH} padded rows: the stock Trainer against the exact gradient",
        [
            "model",
            "rel err",
            "cosine",
            "scale",
            "N(B)",
            "stock divides by",
            "units per micro-batch",
        ],
        [
            [
                r["model"],
                sci(r["rel_err"]),
                f"{r['cosine']:.4f}",
                f"{r['scale']:.3f}",
                f"{r['count']:g}",
                "-" if r["stock_count"] is None else f"{r['stock_count']:g}",
                ", ".join(f"{c:g}" for c in r["micro_batch_counts"]),
            ]
            for r in rows
        ],
    )
    reasons = "\n".join(f"- {r['model']}: {reason}" for r in rows for reason in r["reasons"])
    summary = f"""\
**Answer.** It depends on the model, and the Trainer does not say. GPT-2's step
has the right direction but is {gpt2["scale"]:.3f}× the exact one: the Trainer
divides by {gpt2["stock_count"]:g} labels where the loss predicts
{gpt2["count"]:g} tokens. BERT's forward ignores `num_items_in_batch`, so its
step is {bert["scale"]:.2f}× too large and, with a short last micro-batch, points
elsewhere (cosine {bert["cosine"]:.4f}). The audit says why:

{reasons}

batchgrad's Trainer takes every step on the exact gradient of the window; the
audit runs on your own setup (copies of your model, yours untouched):

```python
from batchgrad.integrations.transformers import Trainer, audit
print(audit(transformers.Trainer(model=model, args=args, train_dataset=data)).summary())
trainer = Trainer(model=model, args=args, train_dataset=data)  # the drop-in fix
```
"""
    return Answer(summary, [table], [], {"audits": rows})


CHAPTER = Chapter(
    slug="trainers",
    title="The Hugging Face Trainer's step, audited",
    question="How far is the Hugging Face Trainer's accumulated gradient from the exact one?",
    run=run,
)
