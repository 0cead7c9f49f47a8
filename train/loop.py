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
memory is retried once with a quarter of the batch. The minibatch losses are read
back every SYNC_EVERY steps, not every step (a read waits for the GPU), and early
whenever the stop rule's check could fall due sooner: the same steps, trace and
checks as reading every step.
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


SYNC_EVERY = 16   # on a GPU: steps between reads of the minibatch losses


def safe_steps(recent: list[float], window: int, bounds: list[float]) -> int:
    """How many of the next steps certainly leave the running mean of the last
    `window` losses above that step's bound (bounds[j - 1] for the j-th step ahead),
    whatever their losses (≥ 0): the mean after j more steps is at least the sum of
    the newest window − j known losses over window. A window not yet full has no
    estimate, so no check. At most len(bounds)."""
    for j, bound in enumerate(bounds, 1):
        if len(recent) + j >= window:   # the window is full after j more steps
            kept = window - j           # known losses still in it then
            lower = sum(recent[len(recent) - kept:]) if kept > 0 else 0.0
            if lower / window <= bound:
                return j - 1
    return len(bounds)


PRECISIONS = ("bf16", "fp32")
COMPILE_LIMIT = 1024  # --compile: graphs one process may compile per code path


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
              precision: str | None = None, compile: bool = False,
              sync_every: int | None = None) -> Result:
    """sync_every: read the minibatch losses back from the device at most every this
    many steps (default: 1 on a CPU, SYNC_EVERY on a GPU), which lets a GPU run
    ahead of Python. The result is the same as reading them every step: a batch of
    losses is read back early whenever the stop rule's check could fall due before
    the next read (`safe_steps`), so every check happens at the step it would."""
    # ------------------------------------------------------------------ setup
    precision = precision or default_precision(device)
    if sync_every is None:
        sync_every = SYNC_EVERY if device.type == "cuda" else 1
    if sync_every < 1:
        raise ValueError(f"sync_every must be at least 1, got {sync_every}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    torch.manual_seed(seed)
    v = config.values
    model = NiN(data.shape[0], data.num_classes, int(v["width"]), int(v["depth"]),
                float(v["dropout"])).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # the training step's forward: in bf16 autocast if asked, compiled if asked
    if compile:
        # a grid compiles one graph per (width, depth, dropout) and batch size in one
        # process: past dynamo's recompile limit (8) it would fall back to eager
        # without a word, while the manifest still said compiled
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   COMPILE_LIMIT)
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
    pending: list[tuple[int, torch.Tensor, float]] = []   # step, loss, lr
    safe, syncs = 0, 0   # steps ahead on which no stop check can fall due; reads
    start = time.perf_counter()
    model.train()

    def settle() -> bool:
        """Read the pending losses back (one sync) and run the per-step bookkeeping
        for each: the estimate, the trace, on_step and, at the newest step, the stop
        rule's check. True when training has converged."""
        nonlocal steps_to_01, confirmed, checks, check_seconds, last_check_epoch, syncs
        losses = torch.stack([p[1] for p in pending]).tolist()
        now = time.perf_counter()   # the steps are done by now (on a GPU, not before)
        syncs += 1
        for (at, _, lr), value in zip(pending, losses, strict=True):
            recent.append(value)
            estimate = sum(recent) / len(recent)
            if steps_to_01 is None and len(recent) == window and estimate <= 0.1:
                steps_to_01 = at
            if at % int(train["trace_every"]) == 0 or at == 1:
                trace.append({"step": at, "epoch": at / steps_per_epoch,
                              "train_loss": estimate, "lr": lr, "seconds": now - start})
            if on_step is not None:
                on_step(at, estimate)
            epoch = at // steps_per_epoch
            due = len(recent) == window and (
                estimate <= threshold
                or (estimate <= 5 * threshold and epoch > last_check_epoch))
            if due:
                # safe_steps kept every earlier pending step clear of a check
                assert at == step, f"a stop check fell due at step {at}, read at {step}"
                t = time.perf_counter()
                confirmed, _ = evaluate(model, data.x_train, data.y_train)
                check_seconds += time.perf_counter() - t
                checks, last_check_epoch = checks + 1, epoch
                if confirmed <= threshold:
                    return True
        pending.clear()
        return False

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
            pending.append((step, loss.detach(), lr))
            if step == steps_per_epoch:
                epoch1_state = snapshot(model)
            safe -= 1
            if safe < 0 or len(pending) >= sync_every or step >= max_steps:
                if settle():
                    converged = True
                    break
                # the check falls due at the threshold, or at 5x it once an epoch
                safe = safe_steps(list(recent), window, [
                    threshold if (step + j) // steps_per_epoch <= last_check_epoch
                    else 5 * threshold for j in range(1, sync_every + 1)])
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
    timing = {"seconds": seconds, "stop_check_seconds": check_seconds, "loss_reads": syncs,
              "steps_per_epoch": steps_per_epoch, "precision": precision, "compiled": compile}
    return Result(model, init_state, epoch1_state or snapshot(model), snapshot(model), trace,
                  outcome, timing)


def resolve_device(name: str) -> torch.device:
    """--device: cpu, cuda, or auto (cuda where there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fgm.warehouse import FgmError
        raise FgmError("--device cuda: no CUDA device is available here (try --device auto)")
    return torch.device(name)
