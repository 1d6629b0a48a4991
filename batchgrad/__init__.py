"""batchgrad: exact gradients however a batch is split.

The public surface; everything else is internal. See DESIGN.md for the contract.
"""

from importlib.metadata import PackageNotFoundError, version

from ._accumulate import AccumulateReport, ExistingGrad, accumulate
from ._bptt import BPTTReport, StepFn, TimeContributions, bptt, tbptt, time_contributions
from ._check import CheckReport, Finding, check
from ._errors import (
    BatchError,
    BatchShapeError,
    ConfigError,
    DistributedError,
    EmptyBatchError,
    ExistingGradError,
    LossTypeError,
    NonFiniteError,
    PerSampleError,
    StateError,
    ZeroCountError,
)
from ._fit import EvalRecord, History, StepRecord, fit
from ._loss import Loss, LossFn
from ._noise import NoiseEstimate, NoiseScale
from ._per_sample import per_sample_grads, per_sample_norms
from ._per_sample_rules import register_per_sample_rule
from ._reduction import Reduction, detect_reduction

try:
    __version__ = version("batchgrad")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "AccumulateReport",
    "BPTTReport",
    "BatchError",
    "BatchShapeError",
    "CheckReport",
    "ConfigError",
    "DistributedError",
    "EmptyBatchError",
    "EvalRecord",
    "ExistingGrad",
    "ExistingGradError",
    "Finding",
    "History",
    "Loss",
    "LossFn",
    "LossTypeError",
    "NoiseEstimate",
    "NoiseScale",
    "NonFiniteError",
    "PerSampleError",
    "Reduction",
    "StateError",
    "StepFn",
    "StepRecord",
    "TimeContributions",
    "ZeroCountError",
    "__version__",
    "accumulate",
    "bptt",
    "check",
    "detect_reduction",
    "fit",
    "per_sample_grads",
    "per_sample_norms",
    "register_per_sample_rule",
    "tbptt",
    "time_contributions",
]
