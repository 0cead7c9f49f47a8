"""Benchmark: every measure of SPEC §4 on one model, timed per family, and the
perturbation searches' reproducibility.

1. a demo-grid model (digits, width 48, depth 3), trained to the stop: seconds
   per family with the default ("paper") budget; then, over search seeds 0-3,
   σ, σ', α, α', the flatness measures 1/scale² and their max/min, and whether
   each search converged. Targets (issue #10): max/min ≤ 1.1 for
   pacbayes_flatness and pacbayes_mag_flatness, ≤ 1.2 for sharpness_flatness and
   sharpness_mag_flatness; the suite ≤ 10 s on CPU.
2. --budgets: the suite with each named budget (fast, paper, thorough).
3. --sweep: how α and α' move as the ascent budget grows (steps x restarts +
   confirming restarts), over seeds 0-3: the paper budget's 10 x 2 + 4 is where
   they have settled (fast: 5 x 1 + 1; thorough: 30 x 2 + 4).
4. --grid DB: the four searches on every model of a warehouse whose models have
   checkpoints (e.g. the demo grid: fgm-train grid --no-measures): how many
   converged, and seconds per model.
5. --batched: the σ draws of one probe scored one forward per draw and as
   grouped forwards (measures/search.py, perturbed_accuracies): seconds each,
   the speedup, and the largest difference between their accuracies.
6. the smallest paper configuration (width 192, 2 blocks) on the CIFAR-10 subset
   in ../shared/data/cifar10-subset, on its first --paper-examples training
   images, trained for --paper-steps steps, with the fast budget.
7. a network that is not a NiN, through the same code: a small ResNet (three
   basic blocks of widths 26, 52, 104, two with 1x1 projection shortcuts, BatchNorm
   folded; ~0.2M weights) on 2,000 random CIFAR-shaped images (3x32x32) labelled by
   a fixed random linear rule on their 8x8-pooled pixels, trained --resnet-steps
   steps; its suite's seconds with the fast budget, next to the demo NiN's
   (--resnet: some 15 minutes on one CPU thread, most of it the four searches).
   --resnet-only: the ResNet alone, with the fast and the default budget, and the
   process's peak memory after each.

    python bench/measures.py [--threads 1] [--budgets] [--sweep] [--grid DB] [--batched]
                             [--cifar-root DIR | --no-paper] [--resnet] [--resnet-only]

Timings depend on the machine's load: --threads 1 gives steadier figures on a
machine shared with other jobs (torch's default uses every core, and two busy
processes on two cores slow each other down many times over).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import resource
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fgm.measures import list_measures
from fgm.measures.context import BUDGETS, Context, Settings
from fgm.measures.search import alpha_search, noise_draws, perturbed_accuracies, sigma_search
from fgm.train.data import load_dataset
from fgm.train.grid import Config
from fgm.train.loop import train_one
from fgm.train.nin import NiN

SEEDS = range(4)
SEARCHES = (  # measure, search scale, search function, magnitude-aware, target max/min
    ("pacbayes_flatness", "sigma", sigma_search, False, 1.1),
    ("pacbayes_mag_flatness", "sigma'", sigma_search, True, 1.1),
    ("sharpness_flatness", "alpha", alpha_search, False, 1.2),
    ("sharpness_mag_flatness", "alpha'", alpha_search, True, 1.2))


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


class Block(nn.Module):
    """A basic residual block: two 3x3 conv-BN layers, a 1x1 conv-BN projection
    shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=(26, 52, 104), classes: int = 10):
        super().__init__()
        a, b, c = widths
        self.stem = nn.Sequential(nn.Conv2d(3, a, 3, 1, 1, bias=False), nn.BatchNorm2d(a),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Block(a, a, 1), Block(a, b, 2), Block(b, c, 2))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_resnet(steps: int, examples: int = 2000, batch: int = 100):
    """SmallResNet on `examples` random 3x32x32 images, labelled by a fixed random
    linear rule on their 8x8-average-pooled pixels: (data, nets, outcome, seconds),
    as train() gives them (init; epoch1 after one pass over the set; final)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 3, 32, 32, generator=gen)
    rule = torch.randn(3 * 4 * 4, 10, generator=gen)
    y = (F.avg_pool2d(x, 8).flatten(1) @ rule).argmax(1)
    torch.manual_seed(0)
    model = SmallResNet()
    nets = {"init": copy.deepcopy(model)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t, order = time.perf_counter(), torch.randperm(examples, generator=gen)
    reached: dict[float, int] = {}       # the first step whose minibatch loss was ≤ 0.1, 0.01
    for step in range(steps):
        if step * batch % examples == 0 and step:
            order = torch.randperm(examples, generator=gen)
        idx = order[step * batch % examples:][:batch]
        loss = F.cross_entropy(model.train()(x[idx]), y[idx])
        for level in (0.1, 0.01):
            if float(loss.detach()) <= level:
                reached.setdefault(level, step + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 == examples // batch:
            nets["epoch1"] = copy.deepcopy(model)
    nets["final"] = model.eval()
    nets.setdefault("epoch1", copy.deepcopy(model))
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 500]) for i in range(0, examples, 500)])
    data = type("Data", (), {})()
    data.x_train, data.y_train, data.num_classes = x, y, 10
    data.info = {"train_size": examples}
    outcome = {"steps": steps, "converged": False, "steps_to_0.1": reached.get(0.1),
               "steps_0.1_to_0.01": (reached[0.01] - reached[0.1]) if 0.01 in reached
               else None,
               "train_acc": float((logits.argmax(1) == y).double().mean()),
               "train_loss": float(F.cross_entropy(logits, y))}
    return data, nets, outcome, time.perf_counter() - t


def context(data, nets, outcome, settings: Settings) -> Context:
    return Context.from_models(nets["final"], data.x_train, data.y_train, data.num_classes,
                               init=nets["init"], epoch1=nets["epoch1"], outcome=outcome,
                               settings=settings)


def run_suite(label, data, nets, outcome, train_s, settings=None, quiet=False) -> float:
    settings = settings or Settings()
    ctx = context(data, nets, outcome, settings)
    per_family, failed, searches = defaultdict(float), [], {}
    start = time.perf_counter()
    for spec in list_measures():
        t = time.perf_counter()
        try:
            out = spec.fn(ctx)
            if isinstance(out, tuple) and "converged" in out[1]:
                key = ("sigma" if "draws" in out[1] else "alpha") \
                    + ("'" if out[1]["magnitude_aware"] else "")
                searches[key] = out[1]
        except Exception as exc:  # report, keep timing the rest
            failed.append(f"{spec.name}: {exc}")
        per_family[spec.family] += time.perf_counter() - t
    total = time.perf_counter() - start
    if quiet:
        return total
    print(f"\n== {label}: {data.info['train_size']} training images, "
          f"{ctx.net.omega} parameters, trained {outcome['steps']} steps in {train_s:.0f} s "
          f"(converged: {outcome['converged']}, train acc {outcome['train_acc']:.3f})")
    for family, s in sorted(per_family.items(), key=lambda kv: -kv[1]):
        print(f"  {family:14s} {s:7.2f} s")
    print(f"  {'total':14s} {total:7.2f} s  ({len(list_measures())} measures, "
          f"budget {settings.budget!r})")
    for key, p in searches.items():
        how = (f"{p['forward_passes']} draws of {p['examples_per_draw']} examples"
               if "draws" in p else
               f"{p['gradient_steps']} ascent steps on {p['ascent_batch_used']} examples")
        print(f"  search {key:6s}: {p['probes']} probes, {how}; converged {p['converged']}, "
              f"deviation {p['reached_deviation']:.4f}")
    for f in failed:
        print(f"  FAILED {f}")
    return total


def spread(data, nets, outcome, settings: Settings, which=SEARCHES) -> dict:
    """Each search at seeds 0-3: {measure: (values 1/scale², converged flags, s/search)}."""
    out = {}
    for measure, name, search, magnitude, limit in which:
        t, runs = time.perf_counter(), []
        for seed in SEEDS:
            ctx = context(data, nets, outcome, dataclasses.replace(settings, seed=seed))
            runs.append(search(ctx, magnitude))
        seconds = (time.perf_counter() - t) / len(SEEDS)
        out[measure] = ([1 / v ** 2 for v, _ in runs], [p["converged"] for _, p in runs],
                        seconds, name, [v for v, _ in runs], limit)
    return out


def print_spread(results: dict, title: str) -> None:
    print(f"\n  {title}")
    print(f"  {'measure':24s} {'scale (seeds 0-3)':36s} {'max/min':>8s} {'target':>7s} "
          f"{'converged':>9s} {'s/search':>8s}")
    for measure, (values, converged, seconds, name, scales, limit) in results.items():
        ratio = max(values) / min(values)
        scales_text = f"{name} " + " ".join(f"{v:.4g}" for v in scales)
        print(f"  {measure:24s} {scales_text:36s} {ratio:8.3f} {'≤' + str(limit):>7s} "
              f"{sum(converged):>5d} / 4 {seconds:8.2f}"
              + ("" if ratio <= limit else "   MISSED"))


def sweep(data, nets, outcome) -> None:
    """How α and α' move as the ascent budget grows."""
    grid = [(5, 1, 0), (10, 1, 0), (5, 1, 1), (10, 1, 2), (10, 2, 4), (20, 2, 2), (30, 2, 4)]
    print("\n  α, α' against the ascent budget (ascent steps x restarts + confirming "
          "restarts), seeds 0-3:")
    print(f"  {'budget':>12s} {'median α':>9s} {'max/min 1/α²':>13s} {'s':>6s} "
          f"{'median α′':>10s} {'max/min 1/α′²':>14s} {'s':>6s}")
    for steps, restarts, confirm in grid:
        s = Settings(ascent_steps=steps, restarts=restarts, confirm_restarts=confirm)
        res = spread(data, nets, outcome, s, SEARCHES[2:])
        cells = []
        for measure in ("sharpness_flatness", "sharpness_mag_flatness"):
            values, converged, seconds, _, scales, _ = res[measure]
            cells.append(f"{statistics.median(scales):10.4g} {max(values) / min(values):13.3f}"
                         f"{'' if all(converged) else '*'} {seconds:6.2f}")
        print(f"  {steps:5d} x {restarts} + {confirm}" + "".join(cells))
    print("  (* a search did not converge)")


def batched(data, nets, outcome, draws: int = 512) -> None:
    """One σ probe's draws, per draw and grouped: seconds, speedup, largest difference."""
    ctx = context(data, nets, outcome, Settings())
    z, examples = noise_draws(ctx, 1, 0, draws)
    u = 0.05 * z
    seconds, accs = {}, {}
    for way in (False, True, False, True):   # twice each: the second of each counts
        t = time.perf_counter()
        accs[way] = perturbed_accuracies(ctx, u, examples, batched=way)
        seconds[way] = time.perf_counter() - t
    diff = max(abs(a - b) for a, b in zip(accs[False], accs[True], strict=True))
    print(f"\n  {draws} σ draws of {examples.shape[1]} examples on {ctx.net.w.device}: one "
          f"forward per draw {seconds[False]:.2f} s, grouped {seconds[True]:.2f} s "
          f"({seconds[False] / seconds[True]:.2f}x); largest accuracy difference {diff:.1e}")


def grid(db: Path, settings: Settings, data_root: Path | None) -> None:
    """The four searches on every model of a warehouse (seed 0)."""
    from fgm.measures.runner import build_context, model_inputs
    from fgm.warehouse import connect
    con = connect(db, read_only=True)
    try:
        rows = [(mid, dataset, model_inputs(con, mid)) for mid, dataset in con.sql(
            "SELECT model_id, dataset FROM models WHERE model_id IN (SELECT model_id FROM "
            "checkpoints WHERE role = 'final') ORDER BY model_id").fetchall()]
    finally:
        con.close()
    total, unconverged, seconds, datasets = 0, [], [], {}
    for mid, dataset, inputs in rows:
        if dataset not in datasets:
            datasets[dataset] = load_dataset(dataset, data_root)
        ctx = build_context(inputs, datasets[dataset], settings, torch.device("cpu"))
        t = time.perf_counter()
        for _, name, search, magnitude, _ in SEARCHES:
            total += 1
            try:
                value, p = search(ctx, magnitude)
            except ValueError as exc:
                unconverged.append(f"{mid} {name}: failed: {exc}")
                continue
            if not p["converged"]:
                unconverged.append(f"{mid} {name} = {value:.4g} (deviation "
                                   f"{p['reached_deviation']:.3f})")
        seconds.append(time.perf_counter() - t)
    print(f"\n== the searches on the {len(rows)} models of {db} (budget "
          f"{settings.budget!r}, seed {settings.seed}): {total - len(unconverged)} of "
          f"{total} converged; {statistics.median(seconds):.1f} s per model (median), "
          f"{max(seconds):.1f} s at most")
    for u in unconverged:
        print(f"  not converged: {u}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--budgets", action="store_true", help="time the suite with every budget")
    ap.add_argument("--sweep", action="store_true", help="α, α' against the ascent budget")
    ap.add_argument("--grid", type=Path, default=None, help="a warehouse: searches per model")
    ap.add_argument("--batched", action="store_true", help="σ draws: per draw vs grouped")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--cifar-root", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "cifar10-subset")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper configuration")
    ap.add_argument("--paper-steps", type=int, default=150)
    ap.add_argument("--paper-examples", type=int, default=500)
    ap.add_argument("--resnet", action="store_true",
                    help="the suite on a small ResNet, next to the NiN's (fast budget)")
    ap.add_argument("--resnet-steps", type=int, default=200)
    ap.add_argument("--resnet-suite", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--resnet-only", action="store_true",
                    help="only the small ResNet, with the fast and the default (paper) "
                         "budget, and the process's peak memory (issue #21: below 2 GiB)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.resnet_suite:
        # one budget's suite in a process of its own: its peak memory is the measures'
        saved = torch.load(args.resnet_suite, weights_only=True)   # written just before
        data = type("Data", (), {})()
        data.x_train, data.y_train = saved["x"], saved["y"]
        data.num_classes, data.info = 10, {"train_size": len(saved["x"])}
        nets = {}
        for role, state in saved["nets"].items():
            nets[role] = SmallResNet()
            nets[role].load_state_dict(state)
        outcome, seconds = saved["outcome"], saved["seconds"]
        run_suite(f"small ResNet, budget {args.budget!r} (3 basic blocks, widths 26/52/104, "
                  "projection shortcuts; 2,000 random 3x32x32 images)", data, nets, outcome,
                  seconds, settings=Settings.preset(args.budget))
        print(f"  peak memory of this process (the measures): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)
        return
    if args.resnet_only:
        import subprocess
        import tempfile
        data, nets, outcome, seconds = train_resnet(args.resnet_steps)
        state = Path(tempfile.mkdtemp()) / "resnet.pt"
        torch.save({"x": data.x_train, "y": data.y_train, "outcome": outcome,
                    "seconds": seconds, "nets": {r: n.state_dict() for r, n in nets.items()}},
                   state)
        for name in ("fast", "paper"):
            subprocess.run([sys.executable, __file__, "--resnet-suite", str(state), "--budget",
                            name, "--threads", str(torch.get_num_threads())], check=True)
        return
    demo = train("digits", 48, 3, 64, 3000)
    run_suite("demo model (digits, width 48, depth 3, batch 64)", *demo)
    print_spread(spread(*demo[:3], Settings()), "the searches over seeds 0-3, budget 'paper':")
    if args.budgets:
        for name in BUDGETS:
            if name != "paper":
                run_suite(f"demo model, budget {name!r}", *demo, settings=Settings.preset(name))
    if args.sweep:
        sweep(*demo[:3])
    if args.batched:
        batched(*demo[:3])
    if args.grid:
        grid(args.grid, Settings(), args.data_root)
    if args.cifar_root.exists() and not args.no_paper:
        run_suite("smallest paper configuration (CIFAR-10 subset, width 192, depth 2)",
                  *train("cifar10", 192, 2, 128, args.paper_steps, args.cifar_root,
                         args.paper_examples), settings=Settings.preset("fast"))
    elif not args.no_paper:
        print(f"\n(no CIFAR-10 subset at {args.cifar_root}: paper configuration skipped)")
    if args.resnet:
        fast = Settings.preset("fast")
        nin = run_suite("demo model, budget 'fast'", *demo, settings=fast, quiet=True)
        resnet = train_resnet(args.resnet_steps)
        res = run_suite("small ResNet (3 basic blocks, widths 26/52/104, projection "
                        "shortcuts; 2,000 random 3x32x32 images)", *resnet, settings=fast)
        omega = context(*resnet[:3], fast).net.omega
        print(f"\n  budget 'fast', one suite each: NiN (digits, width 48, depth 3) "
              f"{nin:.2f} s; ResNet (ω = {omega:,}, 2,000 3x32x32 images) {res:.2f} s")
    print(f"\npeak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
