"""The error hierarchy.

Every error batchgrad raises for bad input is a `BatchError`. Each message says
what is wrong, where (micro-batch index, parameter name, leaf path) and what to
do. When `accumulate` raises one, every ``p.grad`` and every buffer of the model
is exactly as it was before the call.
"""

from __future__ import annotations


class BatchError(Exception):
    """Base class of the errors batchgrad raises for bad input."""


class EmptyBatchError(BatchError):
    """The logical batch holds no samples or no micro-batches."""


class BatchShapeError(BatchError):
    """Tensors of one (micro-)batch disagree on their batch dimension (dimension 0)."""


class LossTypeError(BatchError, TypeError):
    """``loss_fn`` returned something that is not a well-formed `batchgrad.Loss`."""


class NonFiniteError(BatchError):
    """A loss or a gradient is NaN or infinite."""


class ZeroCountError(BatchError):
    """A ``"mean"`` loss over a logical batch with no units: the mean is undefined."""


class ExistingGradError(BatchError):
    """Parameters already hold gradients that the call would silently add to."""


class ConfigError(BatchError, ValueError):
    """An argument has a value batchgrad cannot work with."""


class DistributedError(BatchError):
    """Another rank failed with an error of its own; this rank stops with it."""


class StateError(BatchError):
    """A recurrent state that batchgrad cannot carry between time chunks."""


class PerSampleError(BatchError):
    """A model whose per-sample gradients batchgrad cannot form exactly.

    Raised for a use of a parameter no rule can read the samples' gradients from, and
    by the consistency check (``verify=``) when per-sample gradients disagree with the
    batch gradient; the message names the module or parameter and the reason.
    """
