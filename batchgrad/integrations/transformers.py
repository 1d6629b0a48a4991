"""Exact gradient accumulation in the Hugging Face ``Trainer``.

``transformers.Trainer`` runs a window of ``gradient_accumulation_steps``
micro-batches per optimizer step and adds their gradients. Whether that sum is the
gradient of the window's loss depends on the model: with ``num_items_in_batch`` it
divides by a count of labels that some models ignore (their forward takes
``**kwargs`` and drops it: each micro-batch's mean is then summed) and that it takes
before the shift for causal LMs it does not recognise (one token per row too many);
without it, each micro-batch's mean is divided by the number of micro-batches,
which weighs a unit of a short micro-batch more than one of a long one.

`Trainer` here is the same class with one change: the last ``training_step`` of
each window runs `batchgrad.accumulate` over the whole window (the stock loop has
already fetched it), so ``p.grad`` holds the gradient of

    L(B) = Σ_u ℓ_u / N(B),   B = every micro-batch of the window, on every process,

with ``N(B)`` the units the loss counts: predicted tokens with a label ≠ -100 (after
the shift) for causal LMs, tokens with a label ≠ -100 for masked LMs and token
classifiers, samples (or label elements) for sequence classifiers. The loss is
computed here from the logits, so no model needs to accept ``num_items_in_batch``.
Clipping, the logged loss and the logged grad norm then follow ``L(B)``; a short
last window of an epoch is divided by its own ``N(B)``; under DDP (through
accelerate) ``N(B)`` is the count over every process and DDP synchronises once
per window.

A subclass's ``compute_loss`` may return a `batchgrad.Loss` (``total``, ``count``)
and is then used as it is; ``compute_loss_func`` may return a `batchgrad.Loss`, or
follow the Trainer's contract (the sum of the unit losses divided by
``num_items_in_batch``), which is checked on its first call.

`audit` runs one optimizer step with the stock Trainer and with this one from the
same weights and says how far the stock gradient is, and why.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
import transformers
from torch import Tensor, nn
from transformers.models.auto import modeling_auto

import batchgrad as bg

__all__ = ["AuditReport", "Trainer", "audit", "exact_loss", "head_of"]

Head = Literal["causal_lm", "masked_lm", "token_classification", "sequence_classification"]

_HEAD_BY_LOSS_TYPE: dict[str, Head] = {
    "ForCausalLM": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "ForTokenClassification": "token_classification",
    "ForSequenceClassification": "sequence_classification",
    "ForImageClassification": "sequence_classification",
    "ForAudioClassification": "sequence_classification",
    "ForVideoClassification": "sequence_classification",
}

_HEAD_BY_MAPPING: tuple[tuple[str, Head], ...] = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal_lm"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked_lm"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token_classification"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
)


def head_of(model: nn.Module) -> Head | None:
    """The kind of loss a Hugging Face model computes from its labels, or None.

    Read from the auto-class mappings first (``GPT2LMHeadModel`` declares no
    ``loss_type``), then from ``model.loss_type``. Encoder-decoder models are None:
    their labels also feed the decoder.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return None
    name = type(model).__name__
    for mapping, head in _HEAD_BY_MAPPING:
        if name in getattr(modeling_auto, mapping, {}).values():
            return head
    loss_type = getattr(model, "loss_type", None)
    return _HEAD_BY_LOSS_TYPE.get(loss_type) if isinstance(loss_type, str) else None


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Mapping):
        logits = outputs["logits"]
    elif isinstance(outputs, tuple | list):
        logits = outputs[0]
    else:
        logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, Tensor):
        raise bg.LossTypeError(
            f"The model's outputs hold no logits tensor (got {type(outputs).__name__}); "
            f"return a bg.Loss from compute_loss or compute_loss_func instead."
        )
    # Sums of many half-precision terms lose digits: reduce in float32 at least,
    # never below the model's own dtype (float64 stays float64).
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def exact_loss(
    head: Head,
    outputs: Any,
    labels: Tensor,
    config: Any = None,
    *,
    shift_labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> bg.Loss:
    """The `batchgrad.Loss` (sum and count) of a Hugging Face head's usual loss.

    The mean ``total / count`` equals the model's own loss on one micro-batch:

    - ``"causal_lm"``: cross-entropy of position ``t`` against label ``t + 1``
      (or against ``shift_labels`` as given), over the labels ≠ -100;
    - ``"masked_lm"``, ``"token_classification"``: cross-entropy over the labels ≠ -100;
    - ``"sequence_classification"``: by ``config.problem_type`` as the model infers
      it: cross-entropy over the samples, mean squared error (regression) or
      binary cross-entropy (multi-label) over the label elements.

    With ``label_smoothing = ε`` it is the Trainer's label smoother: smoothed
    cross-entropy over the labels ≠ -100 (shifted for causal LMs), whatever the head.
    """
    logits = _logits(outputs)
    if head == "causal_lm":
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
    labels = labels.to(logits.device)
    if head != "sequence_classification" or label_smoothing:
        criterion = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=label_smoothing)
        if head == "sequence_classification":
            logits = logits.reshape(-1, logits.shape[-1])
        return bg.Loss.from_criterion(
            criterion, logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        )
    num_labels = int(getattr(config, "num_labels", logits.shape[-1]))
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if num_labels == 1:
            logits, labels = logits.squeeze(), labels.squeeze()
        return bg.Loss.from_criterion(nn.MSELoss(), logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return bg.Loss.from_criterion(
            nn.CrossEntropyLoss(), logits.reshape(-1, num_labels), labels.reshape(-1)
        )
    return bg.Loss.from_criterion(nn.BCEWithLogitsLoss(), logits, labels.to(logits.dtype))


def _refuse_unsupported(trainer: transformers.Trainer) -> None:
    """Setups where batchgrad cannot (yet) own the window's backward, refused up front."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    kind = accelerator.distributed_type
    supported = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if kind not in supported:
        raise bg.ConfigError(
            f"batchgrad's Trainer runs in one process or under DDP; this one is set up "
            f"for {kind}. Use transformers.Trainer for it, or DDP."
        )
    if trainer.args.n_gpu > 1:
        raise bg.ConfigError(
            f"TrainingArguments found {trainer.args.n_gpu} GPUs in one process "
            f"(torch.nn.DataParallel); launch one process per GPU (torchrun/accelerate) so "
            f"that the Trainer uses DDP."
        )
    if getattr(accelerator, "scaler", None) is not None:
        raise bg.ConfigError(
            "fp16 with a GradScaler is not supported yet: batchgrad would treat its "
            "overflows as errors. Use bf16=True, or float32."
        )
    config = getattr(accelerator, "parallelism_config", None)
    if config is not None and any(
        getattr(config, flag, False) for flag in ("cp_enabled", "sp_enabled", "tp_enabled")
    ):
        raise bg.ConfigError(
            "Context, sequence and tensor parallelism split one sample over processes; "
            "batchgrad's Trainer supports data parallelism only."
        )


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose every optimizer step carries the exact gradient.

    Same constructor and `transformers.TrainingArguments`. Each optimizer step's
    gradient is that of ``L(B) = Σ_u ℓ_u / N(B)`` over the whole window of
    ``gradient_accumulation_steps`` micro-batches on every process (see the module
    docstring), so the optimizer, gradient clipping, the logged ``loss`` and
    ``grad_norm`` all see the gradient of the big batch.

    After each optimizer step, ``accumulate_report`` holds the `bg.AccumulateReport`
    of its window (``loss``, ``count`` = ``N(B)``, ``micro_batch_counts``, ...).

    Raises:
        bg.ConfigError: a setup batchgrad cannot make exact (DeepSpeed, FSDP,
            ``torch.nn.DataParallel``, fp16 loss scaling, context parallelism, or a
            model whose loss it does not know with neither ``compute_loss`` returning
            a `bg.Loss` nor ``compute_loss_func``).

    Example (run for real by ``examples/hf_trainer.py`` and its test)::

        from batchgrad.integrations.transformers import Trainer

        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accumulate_report: bg.AccumulateReport | None = None
        # True while batchgrad runs the window: compute_loss returns a bg.Loss then.
        self.exact_pass = False
        self._window: list[Any] | None = None
        self._position = 0
        self._loss_func_checked = False
        self._head_cache: tuple[object, Head | None] | None = None
        _refuse_unsupported(self)
        if self.model is not None:
            self._head()

    # -- the window -------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device | None = None
    ) -> tuple[list[Any], None]:
        """Fetch the window's micro-batches; nothing is counted ahead (the loss counts)."""
        window: list[Any] = []
        for _ in range(num_batches):
            try:
                window.append(next(epoch_iterator))
            except StopIteration:
                break
        self._window, self._position = window, 0
        return window, None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Run the whole window with `batchgrad.accumulate` on its last micro-batch.

        The earlier calls of the window only count (the stock loop still wraps them
        in ``no_sync``); the last, outside ``no_sync``, forwards and backpropagates
        every micro-batch and returns ``L(B)``, the loss the Trainer logs.
        """
        window = self._window
        if window is None:
            raise bg.ConfigError(
                "batchgrad's Trainer.training_step runs inside Trainer.train(), which "
                "fetches each window with get_batch_samples first; it was called outside."
            )
        self._position += 1
        if self._position < len(window):
            return torch.zeros((), device=self.args.device)
        self._window = None
        model.train()
        train = getattr(self.optimizer, "train", None)
        if callable(train):
            train()
        micro_batches = [self._prepare_inputs(batch) for batch in window]
        self.exact_pass = True
        try:
            with self.compute_loss_context_manager():
                report = bg.accumulate(model, self._loss_fn, iter(micro_batches))
        finally:
            self.exact_pass = False
        self.accumulate_report = report
        return torch.tensor(report.loss, device=self.args.device)

    def _loss_fn(self, model: nn.Module, inputs: dict[str, Any]) -> bg.Loss:
        loss = self.compute_loss(model, inputs)
        if isinstance(loss, tuple):
            loss = loss[0]
        if not isinstance(loss, bg.Loss):
            raise bg.LossTypeError(
                f"{type(self).__name__}.compute_loss returned a {type(loss).__name__} "
                f"during training; batchgrad needs a bg.Loss(total, count) (the sum of the "
                f"unit losses and their number, e.g. bg.Loss.from_causal_lm(logits, "
                f"labels)) to divide by the window's count. `self.exact_pass` is True "
                f"while it is needed."
            )
        return loss

    # -- the loss ---------------------------------------------------------------

    def _head(self) -> Head | None:
        """The model's head, read once per model (``model_init`` may replace it)."""
        cached = self._head_cache
        if cached is not None and cached[0] is self.model:
            return cached[1]
        model = self.accelerator.unwrap_model(self.model)
        head = head_of(model)
        custom = type(self).compute_loss is not Trainer.compute_loss
        if head is None and self.compute_loss_func is None and not custom:
            raise bg.ConfigError(
                f"batchgrad does not know how {type(model).__name__} reduces its loss "
                f"(loss_type {getattr(model, 'loss_type', None)!r}); pass compute_loss_func "
                f"returning a bg.Loss(total, count), or override compute_loss to return one."
            )
        self._head_cache = (self.model, head)
        return head

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Any:
        """A `bg.Loss` while batchgrad runs a window; the stock loss otherwise."""
        if not self.exact_pass:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self._user_loss(outputs, labels, shift_labels)
        else:
            head = self._head()
            if labels is None or head is None:
                raise bg.LossTypeError(
                    f"The micro-batch has no 'labels' (keys: {sorted(inputs)}); batchgrad "
                    f"computes the loss from them. Add labels in the data collator, or pass "
                    f"compute_loss_func."
                )
            loss = exact_loss(
                head,
                outputs,
                labels,
                getattr(self.accelerator.unwrap_model(model), "config", None),
                shift_labels=shift_labels,
                label_smoothing=self.args.label_smoothing_factor,
            )
        return (loss, outputs) if return_outputs else loss

    def _user_loss(self, outputs: Any, labels: Any, shift_labels: Tensor | None) -> bg.Loss:
        """``compute_loss_func`` as a `bg.Loss`: as it returns one, or by its contract.

        The Trainer's contract is ``Σ_u ℓ_u / num_items_in_batch`` with
        ``num_items_in_batch`` the labels ≠ -100 (after the shift for causal LMs):
        with 1 it returns the sum, and that count is the micro-batch's. The first
        call checks that the function does divide by it.
        """
        func: Callable[..., Any] | None = self.compute_loss_func
        assert func is not None  # only called with one
        first = func(outputs, labels, num_items_in_batch=1)
        if isinstance(first, bg.Loss):
            return first
        if not self._loss_func_checked:
            second = func(outputs, labels, num_items_in_batch=2)
            if not torch.allclose(first.detach(), 2 * second.detach(), rtol=1e-4, atol=0):
                raise bg.ConfigError(
                    "compute_loss_func does not divide its loss by num_items_in_batch "
                    f"(with 1 it returned {float(first.detach()):.6g}, with 2 "
                    f"{float(second.detach()):.6g}), so "
                    "batchgrad cannot tell its units; return a bg.Loss(total, count) from it."
                )
            self._loss_func_checked = True
        if shift_labels is not None:
            counted = shift_labels
        elif isinstance(labels, Tensor):
            causal = self._head() == "causal_lm"
            counted = labels[..., 1:] if causal else labels
        else:
            raise bg.LossTypeError(
                "compute_loss_func returned a tensor for a micro-batch without tensor "
                "labels, so its units cannot be counted; return a bg.Loss(total, count)."
            )
        return bg.Loss(first, counted.ne(-100).sum())


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """How far the stock Trainer's gradient is from the exact one, for one step.

    Attributes:
        rel_err: ``‖g_stock − g_exact‖ / ‖g_exact‖``.
        cosine: the cosine of the angle between them (1: same direction).
        scale: ``⟨g_stock, g_exact⟩ / ‖g_exact‖²``, the factor the stock step
            applies along the exact one (1: right size).
        count: ``N(B)``, the units of the step's logical batch.
        stock_count: what the stock Trainer divides by, ``num_items_in_batch``
            (None when it divides each micro-batch's mean by their number instead).
        micro_batch_counts: the units in each micro-batch of this process.
        reasons: why the stock gradient differs, one sentence each.
    """

    rel_err: float
    cosine: float
    scale: float
    count: int | float
    stock_count: float | None
    micro_batch_counts: tuple[int | float, ...]
    reasons: tuple[str, ...]

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"stock Trainer vs exact gradient: rel err {self.rel_err:.3g}, "
            f"cosine {self.cosine:.6f}, scale {self.scale:.4g}",
            f"units N(B) = {self.count:g} over micro-batches {list(self.micro_batch_counts)}"
            + (
                ""
                if self.stock_count is None
                else f"; the stock Trainer counts {self.stock_count:g}"
            ),
        ]
        return "\n".join([*lines, *(f"- {reason}" for reason in self.reasons)])


class _Stock(transformers.Trainer):
    """The stock Trainer, keeping its first window to recompute its ``num_items_in_batch``."""

    first_window: list[Any] | None = None

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], Tensor | int | None]:
        window, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.first_window is None:
            self.first_window = window
        return window, count


class _GradCapture(transformers.TrainerCallback):
    """Copies every gradient just before the first optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grads: dict[str, Tensor] | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.grads is None:
            self.grads = {
                name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for name, p in self.model.named_parameters()
                if p.requires_grad
            }


def _one_step(cls: type[transformers.Trainer], setup: transformers.Trainer, args: Any) -> Any:
    model = copy.deepcopy(setup.accelerator.unwrap_model(setup.model))
    capture = _GradCapture(model)
    trainer = cls(
        model=model,
        args=args,
        data_collator=setup.data_collator,
        train_dataset=setup.train_dataset,
        processing_class=setup.processing_class,
        compute_loss_func=setup.compute_loss_func,
        callbacks=[capture],
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    transformers.set_seed(args.seed)  # the same data order and dropout in both runs
    trainer.train()
    if capture.grads is None:
        raise bg.EmptyBatchError("The audit's Trainer ran no optimizer step: the dataset is empty.")
    return trainer, capture.grads


def audit(setup: transformers.Trainer) -> AuditReport:
    """Compare one optimizer step of the stock Trainer with the exact one.

    ``setup`` is a Trainer as it would be trained (model, ``TrainingArguments``, data
    collator, dataset, ``compute_loss_func``); it is not trained, and its model is
    not changed: each run trains a copy of the model for one optimizer step (the
    first window of ``gradient_accumulation_steps`` micro-batches, gradient clipping
    off) from the same weights, data order and random state, and the gradients
    before the optimizer step are compared.

    Raises:
        bg.ConfigError: ``setup`` overrides ``compute_loss`` (the stock loss to
            audit is then unknown), or is a setup batchgrad's Trainer refuses.
    """
    overridden = type(setup).compute_loss not in (
        transformers.Trainer.compute_loss,
        Trainer.compute_loss,
    )
    if overridden:
        raise bg.ConfigError(
            f"{type(setup).__name__} overrides compute_loss, so the stock loss to audit is "
            f"not transformers.Trainer's; audit a transformers.Trainer with the same model, "
            f"arguments and data."
        )
    with tempfile.TemporaryDirectory() as folder:
        args = dataclasses.replace(
            setup.args,
            output_dir=folder,
            max_steps=1,
            max_grad_norm=0.0,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        stock, g_stock = _one_step(_Stock, setup, args)
        exact, g_exact = _one_step(Trainer, setup, args)
    names = list(g_exact)
    a = torch.cat([g_stock[n].reshape(-1).double() for n in names])
    b = torch.cat([g_exact[n].reshape(-1).double() for n in names])
    norm = float(b.norm())
    if norm == 0:
        raise bg.ZeroCountError(
            "The exact gradient of the audited step is zero; nothing to compare."
        )
    report = exact.accumulate_report
    assert report is not None  # set by the step the capture saw
    stock_count = _stock_count(stock)
    scale = float(a @ b) / norm**2
    cosine = float(a @ b) / (float(a.norm()) * norm) if float(a.norm()) > 0 else 0.0
    return AuditReport(
        rel_err=float((a - b).norm()) / norm,
        cosine=cosine,
        scale=scale,
        count=report.count,
        stock_count=stock_count,
        micro_batch_counts=report.micro_batch_counts,
        reasons=_reasons(stock, report, stock_count, scale, cosine),
    )


def _stock_count(stock: _Stock) -> float | None:
    """``num_items_in_batch`` as the stock Trainer computed it for the audited window."""
    if stock.first_window is None:
        return None
    count = stock._get_num_items_in_batch(stock.first_window, stock.args.device)
    return None if count is None else float(count)


def _reasons(
    stock: transformers.Trainer,
    report: bg.AccumulateReport,
    stock_count: float | None,
    scale: float,
    cosine: float,
) -> tuple[str, ...]:
    k = report.micro_batches * report.world_size
    counts = report.micro_batch_counts
    reasons: list[str] = []
    passes = stock.model_accepts_loss_kwargs or stock.compute_loss_func is not None
    model_name = type(stock.accelerator.unwrap_model(stock.model)).__name__
    if not passes:
        reasons.append(
            f"{model_name}'s forward takes no **kwargs, so the stock Trainer divides each "
            f"micro-batch's mean by the number of micro-batches ({k}) instead of dividing "
            f"the sum by N(B)."
        )
    else:
        ignored = math.isclose(scale, k, rel_tol=0.25) and not math.isclose(k, 1)
        if ignored and (
            stock_count is None or not math.isclose(scale, report.count / stock_count, rel_tol=0.05)
        ):
            reasons.append(
                f"{model_name} ignores num_items_in_batch: its forward accepts **kwargs but "
                f"returns each micro-batch's own mean, which the stock Trainer sums over the "
                f"{k} micro-batches (about {k}× too large)."
            )
        elif stock_count is not None and not math.isclose(stock_count, report.count):
            rows = stock_count - report.count
            reasons.append(
                f"The stock Trainer divides by {stock_count:g} units where the loss averages "
                f"over {report.count:g} (ratio {report.count / stock_count:.4g}): "
                + (
                    f"labels counted before the shift ({rows:g} more, one per row)."
                    if rows > 0
                    else "it counts other labels than the loss."
                )
            )
    if cosine < 1 - 1e-6 and len(set(counts)) > 1:
        reasons.append(
            f"The micro-batches hold different numbers of units {list(counts)}: weighting "
            f"each micro-batch's mean alike changes the gradient's direction, not only its size."
        )
    if not reasons and abs(scale - 1) > 1e-4:
        reasons.append("The stock gradient differs in size; no known cause was recognised.")
    return tuple(reasons)
