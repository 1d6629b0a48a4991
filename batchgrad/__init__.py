"""batchgrad: exact gradients however a batch is split.

The public surface; everything else is internal. See DESIGN.md for the contract.
"""

from importlib.metadata import PackageNotFoundError, version

from ._accumulate import AccumulateReport, ExistingGrad, LossFn, accumulate
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
    ZeroCountError,
)
from ._loss import Loss
from ._reduction import Reduction, detect_reduction

try:
    __version__ = version("batchgrad")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "AccumulateReport",
    "BatchError",
    "BatchShapeError",
    "CheckReport",
    "ConfigError",
    "DistributedError",
    "EmptyBatchError",
    "ExistingGrad",
    "ExistingGradError",
    "Finding",
    "Loss",
    "LossFn",
    "LossTypeError",
    "NonFiniteError",
    "Reduction",
    "ZeroCountError",
    "__version__",
    "accumulate",
    "check",
    "detect_reduction",
]
