"""Benchmark: fgm on a GPU (issue #12). For the paper grid's extreme
configurations (width 192 and 384 x depth 2 and 8, batch 128, CIFAR-10 shaped
3x32x32 synthetic inputs, 50,000 training examples):

- training images/s through fgm's own loop (train_one: device-resident data,
  --precision's default), and a bare torch loop on the same NiN with bf16
  autocast, channels_last and device-resident uint8 data: the yardstick
  (target: fgm ≥ 90% of it);
- evaluation images/s (fp32, fgm's evaluate) and peak GPU memory;
- the measure suite's seconds with the default ("paper") budgets on the whole
  training set (target: ≤ 60 s at width 192, depth 4), on a model whose labels
  are its own predictions (100% training accuracy: every search has a target);
- the paper grid (2,187 models: widths 192/384/768 x depths 2/4/8 x 243 other
  configurations) projected in GPU-hours: per model, --epochs epochs of
  training at the measured rate plus one measure suite, the seconds of each
  (width, depth) interpolated in log-seconds, bilinear in log(width) and depth
  from the measured corners (width 768: extrapolated) (target: ≤ 24 h).

--compile adds, per configuration, training with torch.compile: the seconds the
first model of a shape spends compiling and the images/s after (the option
pays only where a model trains for longer than that costs).

JSON to --json (or stdout), one summary line to stderr.

    python bench/gpu.py [--device cuda] [--json out.json] [--epochs 40] [--compile]
    python bench/gpu.py --small        # tiny sizes (the default on a CPU): CI keeps it alive
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from fgm.measures import list_measures
from fgm.measures.context import Context, Settings
from fgm.train.data import Data, normalised
from fgm.train.grid import Config
from fgm.train.loop import default_precision, evaluate, train_one
from fgm.train.nin import NiN

PAPER_WIDTHS, PAPER_DEPTHS, OTHER_CONFIGS = (192, 384, 768), (2, 4, 8), 243
FULL = {"widths": (192, 384), "depths": (2, 8), "examples": 50_000, "batch": 128,
        "train_steps": 300, "suite": [(192, 4), (192, 2), (192, 8), (384, 2), (384, 8)],
        "budget": "paper", "overrides": {}}
SMALL = {"widths": (4, 8), "depths": (2, 8), "examples": 256, "batch": 32,
         "train_steps": 6, "suite": [(4, 2)], "budget": "fast",
         "overrides": {"draws": 16, "draws_min": 4, "bisection_steps": 3}}   # alive, not exact


def synthetic(m: int, device: torch.device, seed: int = 0) -> Data:
    """CIFAR-10 shaped uint8 images and random labels, resident on `device`."""
    gen = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (m + m // 5, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (len(u8),), generator=gen)
    a = u8[:m].float()
    mean = a.mean(dim=(0, 2, 3), keepdim=True)
    std = a.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    raw = (u8[:m], u8[m:], mean, std)
    data = Data("synthetic", normalised(raw[0], mean, std), y[:m], normalised(raw[1], mean, std),
                y[m:], 10, {"train_size": m, "test_size": len(u8) - m}, raw)
    return data.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fgm_training(data: Data, width: int, depth: int, batch: int, steps: int,
                 device: torch.device, compile: bool = False) -> float:
    """Images/s of train_one over `steps` steps (a stop threshold never reached), after
    a warm-up run (with compile: the one that compiles; later models of the same shape
    reuse its code, as a grid's do)."""
    values = {"width": width, "depth": depth, "dropout": 0.0, "batch_size": batch,
              "optimizer": "sgd", "learning_rate": 0.01, "weight_decay": 0.0}
    train = {"stop_cross_entropy": 1e-12, "max_steps": steps, "lr_drop_steps": [10 ** 9],
             "lr_drop_factor": 0.1, "estimate_batches": 100, "trace_every": 500}
    config = Config(values, {a: 0 for a in values})
    train_one(config, data, dict(train, max_steps=min(steps, 5)), 0, device,
              compile=compile)   # warm-up
    sync(device)
    r = train_one(config, data, train, 0, device, compile=compile)
    return steps * batch / r.timing["seconds"]


def compiled_training(data: Data, width: int, depth: int, batch: int, steps: int,
                      device: torch.device) -> dict:
    """--compile measured: the seconds its first model of a shape takes to compile
    (the warm-up's wall time less an eager warm-up's), then images/s."""
    t = time.perf_counter()
    fgm_training(data, width, depth, batch, 1, device)
    eager = time.perf_counter() - t
    torch._dynamo.reset()      # every shape compiles afresh: what a new process pays
    t = time.perf_counter()
    fgm_training(data, width, depth, batch, 1, device, compile=True)
    first = time.perf_counter() - t
    return {"compiled_train_images_per_s": fgm_training(data, width, depth, batch, steps,
                                                        device, compile=True),
            "compile_seconds": max(first - eager, 0.0)}


def bare_training(data: Data, width: int, depth: int, batch: int, steps: int,
                  device: torch.device) -> float:
    """The yardstick: the same NiN in the plainest fast torch loop (bf16 autocast on
    CUDA, channels_last, uint8 data on the device, batches drawn there)."""
    torch.manual_seed(0)
    u8, _, mean, std = (t.to(device) for t in data.raw)
    y, m = data.y_train, len(data.y_train)
    model = NiN(3, 10, width, depth).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)

    def run(n: int) -> None:
        for _ in range(n):
            idx = torch.randint(0, m, (batch,), device=device, generator=gen)
            x = ((u8[idx].float() - mean) / std).contiguous(
                memory_format=torch.channels_last if device.type == "cuda"
                else torch.contiguous_format)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    run(min(steps, 5))
    sync(device)
    t = time.perf_counter()
    run(steps)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def evaluation(data: Data, width: int, depth: int, device: torch.device) -> float:
    model = NiN(3, 10, width, depth).to(device)
    evaluate(model, data.x_train[:256], data.y_train[:256])   # warm-up
    sync(device)
    t = time.perf_counter()
    evaluate(model, data.x_train, data.y_train)
    sync(device)
    return len(data.x_train) / (time.perf_counter() - t)


def suite(data: Data, width: int, depth: int, budget: str, overrides: dict,
          device: torch.device) -> tuple[float, list[str]]:
    """Seconds of every registered measure on one model whose labels are its own
    predictions; the measures that failed (e.g. those needing a training trace);
    seconds per family."""
    torch.manual_seed(1)
    final, init, epoch1 = (NiN(3, 10, width, depth).to(device).eval() for _ in range(3))
    with torch.no_grad():
        def logits():
            return torch.cat([final(data.x_train[i:i + 1024])
                              for i in range(0, len(data.x_train), 1024)])
        # a random net's logits differ little between inputs: centred per class, its
        # predictions spread over the classes (else one class wins everywhere and no
        # perturbation lowers the accuracy)
        final.classifier.bias -= logits().mean(0)
        y = logits().argmax(1)
    ctx = Context.from_models(final, data.x_train, y, 10, init=init, epoch1=epoch1,
                              outcome={}, settings=Settings.preset(budget, **overrides))
    failed, families = [], {}
    sync(device)
    start = time.perf_counter()
    for spec in list_measures():
        t = time.perf_counter()
        try:
            spec.fn(ctx)
        except Exception as exc:   # timed all the same; listed
            failed.append(f"{spec.name}: {type(exc).__name__}")
        sync(device)
        families[spec.family] = families.get(spec.family, 0.0) + time.perf_counter() - t
    return time.perf_counter() - start, failed, families


def _bilinear(corners: dict, width: int, depth: int) -> float:
    """log-value bilinear in (log width, depth) through the four measured corners."""
    (w0, w1), (d0, d1) = sorted({w for w, _ in corners}), sorted({d for _, d in corners})
    u = math.log(width / w0) / math.log(w1 / w0)
    v = (depth - d0) / (d1 - d0)
    lg = {k: math.log(x) for k, x in corners.items()}
    return math.exp((1 - u) * (1 - v) * lg[w0, d0] + u * (1 - v) * lg[w1, d0]
                    + (1 - u) * v * lg[w0, d1] + u * v * lg[w1, d1])


def project(train_ips: dict, suite_s: dict, examples: int, epochs: float) -> dict:
    """GPU-hours of the paper grid: per (width, depth), epochs x examples / images/s
    plus one suite, each interpolated from the corners (a suite measured at one
    corner only stands for all four)."""
    if len(suite_s) < 4:
        suite_s = {k: next(iter(suite_s.values())) for k in train_ips}
    per_model = {}
    for w, d in itertools.product(PAPER_WIDTHS, PAPER_DEPTHS):
        train_s = epochs * examples / _bilinear(train_ips, w, d)
        per_model[f"{w}x{d}"] = train_s + _bilinear(suite_s, w, d)
    hours = sum(per_model.values()) * OTHER_CONFIGS / 3600
    return {"gpu_hours": hours, "models": len(per_model) * OTHER_CONFIGS,
            "epochs_assumed": epochs, "seconds_per_model": per_model,
            "method": "per (width, depth): epochs x training examples / training images/s "
                      "+ one measure suite, both log-bilinear in (log width, depth) through "
                      "the measured corners (width 768 extrapolated); batch 128 throughout; "
                      "the 243 other configurations cost the same"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (the default on a CPU)")
    ap.add_argument("--full", action="store_true", help="full sizes even on a CPU (slow)")
    ap.add_argument("--epochs", type=float, default=40.0,
                    help="epochs to convergence assumed for the projection (default 40)")
    ap.add_argument("--json", default=None, help="write the JSON here (default: stdout)")
    ap.add_argument("--compile", action="store_true",
                    help="also time training with --compile (torch.compile): compile seconds "
                         "per shape and images/s after")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: --device cuda, but no CUDA device is available here")
    sizes = SMALL if args.small or (device.type == "cpu" and not args.full) else FULL
    data = synthetic(sizes["examples"], device)
    rows, train_ips, suite_s = [], {}, {}
    for width, depth in itertools.product(sizes["widths"], sizes["depths"]):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fgm = fgm_training(data, width, depth, sizes["batch"], sizes["train_steps"], device)
        bare = bare_training(data, width, depth, sizes["batch"], sizes["train_steps"], device)
        ev = evaluation(data, width, depth, device)
        train_ips[width, depth] = fgm
        rows.append({"width": width, "depth": depth, "train_images_per_s": fgm,
                     "bare_torch_images_per_s": bare, "fraction_of_bare": fgm / bare,
                     "eval_images_per_s": ev,
                     "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                     if device.type == "cuda" else None})
        if args.compile:
            rows[-1].update(compiled_training(data, width, depth, sizes["batch"],
                                              sizes["train_steps"], device))
            rows[-1]["compiled_speedup"] = rows[-1]["compiled_train_images_per_s"] / fgm
    suites = []
    for width, depth in sizes["suite"]:
        seconds, failed, families = suite(data, width, depth, sizes["budget"],
                                         sizes["overrides"], device)
        suites.append({"width": width, "depth": depth, "seconds": seconds,
                       "examples": sizes["examples"], "budget": sizes["budget"],
                       "overrides": sizes["overrides"], "seconds_per_family": families,
                       "failed": failed})
        if (width, depth) in train_ips:
            suite_s[width, depth] = seconds
    if not suite_s:
        suite_s = {next(iter(train_ips)): suites[0]["seconds"]}
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "precision": default_precision(device),
           "small": sizes is SMALL, "batch": sizes["batch"], "examples": sizes["examples"],
           "train_steps": sizes["train_steps"], "configs": rows, "suites": suites,
           "projection": project(train_ips, suite_s, 50_000, args.epochs)}
    text = json.dumps(out, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    worst = min(r["fraction_of_bare"] for r in rows)
    print(f"bench/gpu.py on {out['device']}{' (small sizes)' if out['small'] else ''}: "
          f"training {min(train_ips.values()):,.0f}-{max(train_ips.values()):,.0f} images/s "
          f"(≥ {worst:.0%} of bare torch), suite {suites[0]['seconds']:.1f} s at "
          f"{suites[0]['width']}x{suites[0]['depth']}, paper grid "
          f"{out['projection']['gpu_hours']:,.1f} GPU-hours at {args.epochs:g} epochs"
          + (f"; --compile {min(r['compiled_speedup'] for r in rows):.2f}-"
             f"{max(r['compiled_speedup'] for r in rows):.2f}x after "
             f"{max(r['compile_seconds'] for r in rows):.0f} s of compiling per shape"
             if args.compile else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()
