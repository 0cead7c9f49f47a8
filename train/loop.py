"""Train one NiN to the cross-entropy stop (SPEC §3). Reads top to bottom.

The stop rule: a running mean of the last `estimate_batches` minibatch losses
estimates the training cross-entropy for free; when it reaches the threshold
the full training set is evaluated in eval mode, and training stops only if
that confirmed value is at or below the threshold (it is stored as the final
train_loss). Dropout makes train-mode losses pessimistic, so the full-set
check also runs once per epoch while the estimate is within 5x the threshold.

On a device: the data stay resident there (Data.to normalises them there) and
every batch is drawn by index from them, in the same seeded order as on a CPU.
The training step may run in bf16 autocast (`precision`, the default on CUDA;
channels_last there too); the stop rule's confirmation pass and every stored
accuracy and loss are computed in fp32. An evaluation that runs out of device
memory is retried once with a quarter of the batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Data
from .grid import Config
from .nin import NiN


@dataclass
class Result:
    model: nn.Module
    init_state: dict[str, torch.Tensor]
    epoch1_state: dict[str, torch.Tensor] | None
    final_state: dict[str, torch.Tensor]
    trace: list[dict] = field(default_factory=list)
    outcome: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    lr, wd = float(config.values["learning_rate"]), float(config.values["weight_decay"])
    name = config.values["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, eps=1e-3, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(step: int, base: float, drops: list[int], factor: float) -> float:
    """Learning rate for `step` (0-based): base x factor^(number of drop steps passed)."""
    return base * factor ** sum(step >= s for s in drops)


PRECISIONS = ("bf16", "fp32")


def default_precision(device: torch.device) -> str:
    """bf16 on CUDA (its tensor cores), fp32 elsewhere (a CPU's bf16 is slow and lossy)."""
    return "bf16" if device.type == "cuda" else "fp32"


def retry_smaller(fn: Callable[[int], object], batch: int):
    """fn(batch); if the device runs out of memory, once more with a quarter of the
    batch (the second out-of-memory error is the caller's: that model fails)."""
    try:
        return fn(batch)
    except torch.OutOfMemoryError:
        if batch <= 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return fn(max(1, batch // 4))


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              batch: int) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch])
            loss_sum += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    finally:
        model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a whole set, in eval mode and fp32."""
    return retry_smaller(lambda b: _evaluate(model, x, y, b), batch)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def train_one(config: Config, data: Data, train: dict, seed: int, device: torch.device,
              on_step: Callable[[int, float], None] | None = None,
              precision: str | None = None, compile: bool = False) -> Result:
    # ------------------------------------------------------------------ setup
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    torch.manual_seed(seed)
    v = config.values
    model = NiN(data.shape[0], data.num_classes, int(v["width"]), int(v["depth"]),
                float(v["dropout"])).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # the training step's forward: in bf16 autocast if asked, compiled if asked
    forward = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if precision == "bf16" else contextlib.nullcontext
    optimizer = make_optimizer(model, config)
    base_lr = float(v["learning_rate"])
    threshold = float(train["stop_cross_entropy"])
    max_steps, window = int(train["max_steps"]), int(train["estimate_batches"])
    drops, factor = list(train["lr_drop_steps"]), float(train["lr_drop_factor"])
    batch = int(v["batch_size"])
    m = len(data.x_train)
    steps_per_epoch = math.ceil(m / batch)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    init_state, epoch1_state = snapshot(model), None

    # ------------------------------------------------------------------ loop
    recent: deque[float] = deque(maxlen=window)
    trace: list[dict] = []
    step, steps_to_01, confirmed, converged = 0, None, math.nan, False
    checks, check_seconds, last_check_epoch = 0, 0.0, -1
    start = time.perf_counter()
    model.train()
    while step < max_steps and not converged:
        order = torch.randperm(m, generator=gen).to(device)
        for i in range(0, m, batch):
            lr = lr_at(step, base_lr, drops, factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[i:i + batch]
            with autocast():
                loss = F.cross_entropy(forward(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            recent.append(loss.item())
            estimate = sum(recent) / len(recent)
            if steps_to_01 is None and len(recent) == window and estimate <= 0.1:
                steps_to_01 = step
            if step % int(train["trace_every"]) == 0 or step == 1:
                trace.append({"step": step, "epoch": step / steps_per_epoch,
                              "train_loss": estimate, "lr": lr,
                              "seconds": time.perf_counter() - start})
            if on_step is not None:
                on_step(step, estimate)
            if step == steps_per_epoch:
                epoch1_state = snapshot(model)
            epoch = step // steps_per_epoch
            due = len(recent) == window and (
                estimate <= threshold
                or (estimate <= 5 * threshold and epoch > last_check_epoch))
            if due:
                t = time.perf_counter()
                confirmed, _ = evaluate(model, data.x_train, data.y_train)
                check_seconds += time.perf_counter() - t
                checks, last_check_epoch = checks + 1, epoch
                if confirmed <= threshold:
                    converged = True
                    break
            if step >= max_steps:
                break

    # ------------------------------------------------------------------ finish
    seconds = time.perf_counter() - start
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    if steps_to_01 is None and converged:
        steps_to_01 = step   # crossed 0.1 and 0.01 within one estimate window
    if trace and trace[-1]["step"] == step:  # the last step was traced already: replace it
        trace.pop()
    trace.append({"step": step, "epoch": step / steps_per_epoch, "train_loss": train_loss,
                  "lr": lr_at(step - 1, base_lr, drops, factor), "seconds": seconds})
    outcome = {
        "train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss,
        "test_loss": test_loss, "gap": train_acc - test_acc, "converged": converged,
        "steps": step, "steps_to_0.1": steps_to_01,
        "steps_0.1_to_0.01": (step - steps_to_01) if converged and steps_to_01 else None,
        "stop_checks": checks,
    }
    timing = {"seconds": seconds, "stop_check_seconds": check_seconds,
              "steps_per_epoch": steps_per_epoch, "precision": precision, "compiled": compile}
    return Result(model, init_state, epoch1_state or snapshot(model), snapshot(model), trace,
                  outcome, timing)
