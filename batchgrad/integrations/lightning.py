"""Exact gradient accumulation in Lightning.

Lightning's ``Trainer(accumulate_grad_batches=K)`` backpropagates each batch's
``loss / K``: every batch's mean weighs the same whatever its number of units
(padded tokens, masked samples, a short last batch), and the last window of an
epoch, shorter than ``K``, is still divided by ``K``.

`ExactAccumulation` is a ``LightningModule`` that runs each window of
``accumulate_grad_batches`` batches with `batchgrad.accumulate` instead (manual
optimisation): the module defines ``training_loss(batch) -> bg.Loss`` (the sum of
the unit losses and their number) in place of ``training_step``, and every
optimizer step carries the gradient of

    L(B) = Σ_u ℓ_u / N(B),   B = the window's batches, on every process,

a short last window of an epoch divided by its own ``N(B)``. Under the DDP
strategy ``N(B)`` is the count over every process and the gradients are summed
over the processes once per window. Gradient clipping (``gradient_clip_val``, an
attribute of the module: Lightning clips only under automatic optimisation), the
logged ``train_loss`` and ``grad_norm`` follow ``L(B)``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

import batchgrad as bg

__all__ = ["ExactAccumulation"]


class ExactAccumulation(pl.LightningModule):
    """A ``LightningModule`` whose every optimizer step has the exact window gradient.

    Subclass it instead of ``LightningModule``, define ``training_loss(batch)``
    returning a `bg.Loss` instead of ``training_step``, and set
    ``accumulate_grad_batches`` on the module instead of the Trainer. One optimizer
    (from ``configure_optimizers``) is stepped and zeroed once per window; its
    learning-rate schedulers, if any, are stepped after it (``interval="step"``) or
    at the end of each epoch (``interval="epoch"``).

    Attributes:
        accumulate_grad_batches: batches per optimizer step (default 1).
        gradient_clip_val: clip the window's gradient to this norm (default: none).
        accumulate_report: the `bg.AccumulateReport` of the last optimizer step.

    Raises:
        bg.ConfigError: at the start of ``fit``, for a strategy other than one
            device or DDP, or for 16-bit mixed precision with loss scaling (use
            ``"bf16-mixed"``).

    Example (run for real by ``examples/lightning_train.py`` and its test)::

        import torch, batchgrad as bg

        class Model(ExactAccumulation):
            accumulate_grad_batches = 4

            def training_loss(self, batch):
                x, y = batch
                return bg.Loss.from_criterion(torch.nn.CrossEntropyLoss(), self.net(x), y)
    """

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accumulate_report: bg.AccumulateReport | None = None
        self._window: list[Any] = []

    @property
    def automatic_optimization(self) -> bool:
        """Always False: batchgrad runs the backward and the optimizer step."""
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise bg.ConfigError(
                "ExactAccumulation runs the window's backward itself (manual optimisation); "
                "automatic_optimization cannot be turned on."
            )

    def training_loss(self, batch: Any) -> bg.Loss:
        """The `bg.Loss` of one batch: the sum of its unit losses and their number."""
        raise NotImplementedError(
            f"{type(self).__name__} must define training_loss(self, batch) -> bg.Loss."
        )

    def on_fit_start(self) -> None:
        size = self.accumulate_grad_batches
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise bg.ConfigError(f"accumulate_grad_batches must be an int ≥ 1, got {size!r}.")
        strategy = self.trainer.strategy
        if not isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
            raise bg.ConfigError(
                f"ExactAccumulation runs on one device or under the DDP strategy, not "
                f"{type(strategy).__name__}."
            )
        precision = self.trainer.precision_plugin
        if getattr(precision, "scaler", None) is not None:  # MixedPrecision's GradScaler
            raise bg.ConfigError(
                "16-bit mixed precision scales the loss with a GradScaler, which batchgrad "
                "does not drive yet; use precision='bf16-mixed' or '32-true'."
            )
        self._window = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Collect the window; on its last batch, accumulate it exactly and step."""
        self._window.append(batch)
        if len(self._window) < self.accumulate_grad_batches and not self._last_batch(batch_idx):
            return
        window, self._window = self._window, []
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise bg.ConfigError(
                "ExactAccumulation steps one optimizer; configure_optimizers returned "
                f"{len(optimizer)}."
            )
        report = bg.accumulate(self, _loss_fn, iter(window))
        self.accumulate_report = report
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer.optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._step_schedulers("step")
        self.log("train_loss", report.loss, prog_bar=True, batch_size=len(window))
        self.log("grad_norm", report.grad_norm, batch_size=len(window))  # before clipping

    def on_train_epoch_end(self) -> None:
        if self._window:  # the loop ended the epoch early (max_steps, limit_train_batches)
            self._window = []
        self._step_schedulers("epoch")

    def _last_batch(self, batch_idx: int) -> bool:
        """Whether this batch ends the epoch, so that its window is cut short."""
        loop = self.trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch:
            return True
        total = self.trainer.num_training_batches
        return isinstance(total, int) and batch_idx + 1 >= total

    def _step_schedulers(self, interval: str) -> None:
        configs = self.trainer.lr_scheduler_configs
        for config in configs:
            if config.interval == interval and config.frequency > 0:
                scheduler: Any = config.scheduler
                scheduler.step()


def _loss_fn(model: nn.Module, batch: Any) -> bg.Loss:
    loss = model.training_loss(batch)  # type: ignore[operator]
    if not isinstance(loss, bg.Loss):
        raise bg.LossTypeError(
            f"training_loss returned a {type(loss).__name__}; it must return a "
            f"bg.Loss(total, count): the sum of the batch's unit losses and their number "
            f"(e.g. bg.Loss.from_criterion(criterion, output, target))."
        )
    return loss
