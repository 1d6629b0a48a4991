"""A Trainer setup for ``batchgrad audit`` (tiny random-init GPT-2, padded rows)."""

import tempfile

import transformers

from tests.integrations import hf


def make_trainer():
    folder = tempfile.mkdtemp(prefix="batchgrad-audit-")
    return transformers.Trainer(
        model=hf.build_model("gpt2"),
        args=hf.training_args(folder),
        train_dataset=hf.build_data("gpt2", 12),
        data_collator=hf.Collator(),
    )


def not_a_trainer():
    return 3
