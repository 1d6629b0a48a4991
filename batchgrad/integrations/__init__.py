"""Exact accumulation inside the trainers people already use.

Each integration is its own module and imports its library only when imported
itself, so ``import batchgrad`` never pulls in transformers, Lightning or
accelerate (install them with the ``[transformers]`` / ``[lightning]`` extras):

- `batchgrad.integrations.transformers`: ``Trainer``, a drop-in subclass of
  ``transformers.Trainer``, and ``audit``, how far the stock Trainer's step is
  from the exact one on a given setup;
- `batchgrad.integrations.lightning`: ``ExactAccumulation``, a ``LightningModule``
  mixin;
- accelerate needs no module: `batchgrad.accumulate` takes an
  ``accelerator.prepare``'d model as it is (see the README).
"""
