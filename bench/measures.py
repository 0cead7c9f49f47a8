"""Benchmark: every measure of SPEC §4 on one model, timed per family.

1. a demo-grid model (digits, width 48, depth 3), trained to the stop;
2. the smallest paper configuration (width 192, 2 blocks) on the CIFAR-10
   subset in ../shared/data/cifar10-subset, on its first --paper-examples
   training images (a forward pass over all 4,000 takes seconds on 2 cores,
   and the searches make hundreds), trained for --paper-steps steps: enough
   for the searches to have an accuracy to lower.

Prints seconds per family and in total, forward passes per search and peak
memory. Target: every measure of one demo model in under 10 s.

    python bench/measures.py [--cifar-root ../shared/data/cifar10-subset] [--paper-steps 400]
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from fgm.measures import list_measures
from fgm.measures.context import Context, Settings
from fgm.train.data import load_dataset
from fgm.train.grid import Config
from fgm.train.loop import train_one
from fgm.train.nin import NiN


def train(dataset, width, depth, batch, steps, root=None, examples=None):
    data = load_dataset(dataset, root)
    if examples:
        data.x_train, data.y_train = data.x_train[:examples], data.y_train[:examples]
        data.info["train_size"] = examples
    values = {"width": width, "depth": depth, "dropout": 0.0, "batch_size": batch,
              "optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0}
    settings = {"stop_cross_entropy": 0.01, "max_steps": steps, "lr_drop_steps": [10 ** 9],
                "lr_drop_factor": 0.1, "estimate_batches": 20, "trace_every": 50}
    t = time.perf_counter()
    r = train_one(Config(values, {a: 0 for a in values}), data, settings, 0,
                  torch.device("cpu"))
    nets = {}
    for role, state in (("final", r.final_state), ("init", r.init_state),
                        ("epoch1", r.epoch1_state)):
        nets[role] = NiN(data.shape[0], 10, width, depth)
        nets[role].load_state_dict(state)
    return data, nets, r.outcome, time.perf_counter() - t


def run_suite(label, data, nets, outcome, train_s, settings=None):
    settings = settings or Settings()
    ctx = Context.from_models(nets["final"], data.x_train, data.y_train, data.num_classes,
                              init=nets["init"], epoch1=nets["epoch1"], outcome=outcome,
                              settings=settings)
    per_family, failed = defaultdict(float), []
    searches = {}
    start = time.perf_counter()
    for spec in list_measures():
        t = time.perf_counter()
        try:
            out = spec.fn(ctx)
            if isinstance(out, tuple) and ("forward_passes" in out[1] or "evaluations" in out[1]):
                key = "sigma'" if out[1].get("magnitude_aware") else "sigma"
                if "evaluations" in out[1]:
                    key = "alpha'" if out[1].get("magnitude_aware") else "alpha"
                searches[key] = out[1]
        except Exception as exc:  # report, keep timing the rest
            failed.append(f"{spec.name}: {exc}")
        per_family[spec.family] += time.perf_counter() - t
    total = time.perf_counter() - start
    print(f"\n== {label}: {data.info['train_size']} training images, "
          f"{ctx.net.omega} parameters, trained {outcome['steps']} steps in {train_s:.0f} s "
          f"(converged: {outcome['converged']}, train acc {outcome['train_acc']:.3f})")
    for family, s in sorted(per_family.items(), key=lambda kv: -kv[1]):
        print(f"  {family:14s} {s:7.2f} s")
    print(f"  {'total':14s} {total:7.2f} s  ({len(list_measures())} measures)")
    changed = {k: v for k, v in vars(settings).items() if v != getattr(Settings(), k)}
    print(f"  search settings: {'defaults' if not changed else changed}")
    for key, p in searches.items():
        if "forward_passes" in p:
            print(f"  search {key}: {p['forward_passes']} forward passes over the training set "
                  f"({p['bisection_steps_used']} bisection steps x {p['draws']} draws)")
        else:
            print(f"  search {key}: {p['evaluations']} radii x {p['restarts']} restarts x "
                  f"({p['ascent_steps']} ascent steps on {p['ascent_batch']} examples + "
                  f"1 pass over the training set)")
    for f in failed:
        print(f"  FAILED {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar-root", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "cifar10-subset")
    ap.add_argument("--paper-steps", type=int, default=150)
    ap.add_argument("--paper-examples", type=int, default=500)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    run_suite("demo model (digits, width 48, depth 3, batch 64)",
              *train("digits", 48, 3, 64, 3000))
    if args.cifar_root.exists():
        # a width-192 network on 2 CPU cores: smaller ascent minibatches and fewer draws
        run_suite("smallest paper configuration (CIFAR-10 subset, width 192, depth 2)",
                  *train("cifar10", 192, 2, 128, args.paper_steps, args.cifar_root,
                         args.paper_examples), settings=Settings(ascent_batch=64, draws=4))
    else:
        print(f"\n(no CIFAR-10 subset at {args.cifar_root}: paper configuration skipped)")
    print(f"\npeak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
