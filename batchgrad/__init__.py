"""batchgrad: exact gradients however a batch is split.

The public surface; everything else is internal. README.md documents it.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# The names load on first use (PEP 562), so `import batchgrad` and `batchgrad --help`
# do not wait for torch; the imports below are what they resolve to.
if TYPE_CHECKING:
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
    from ._per_sample_modules import register_per_sample_rule
    from ._reduction import Reduction, detect_reduction

_WHERE = {
    "AccumulateReport": "._accumulate",
    "ExistingGrad": "._accumulate",
    "accumulate": "._accumulate",
    "BPTTReport": "._bptt",
    "StepFn": "._bptt",
    "TimeContributions": "._bptt",
    "bptt": "._bptt",
    "tbptt": "._bptt",
    "time_contributions": "._bptt",
    "CheckReport": "._check",
    "Finding": "._check",
    "check": "._check",
    "BatchError": "._errors",
    "BatchShapeError": "._errors",
    "ConfigError": "._errors",
    "DistributedError": "._errors",
    "EmptyBatchError": "._errors",
    "ExistingGradError": "._errors",
    "LossTypeError": "._errors",
    "NonFiniteError": "._errors",
    "PerSampleError": "._errors",
    "StateError": "._errors",
    "ZeroCountError": "._errors",
    "EvalRecord": "._fit",
    "History": "._fit",
    "StepRecord": "._fit",
    "fit": "._fit",
    "Loss": "._loss",
    "LossFn": "._loss",
    "NoiseEstimate": "._noise",
    "NoiseScale": "._noise",
    "per_sample_grads": "._per_sample",
    "per_sample_norms": "._per_sample",
    "register_per_sample_rule": "._per_sample_modules",
    "Reduction": "._reduction",
    "detect_reduction": "._reduction",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None and name.startswith("_") and not name.startswith("__"):
        try:  # a private submodule, e.g. batchgrad._split
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            pass
    if where is None:
        raise AttributeError(f"module 'batchgrad' has no attribute {name!r}")
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
