"""What a measure function gets: the folded network as a flat parameter vector
(measures/network.py: any network of Conv2d / Linear layers, BatchNorm, pooling,
activations and residual additions), the initial and epoch-1 weights in the same
layout, the training data, the trace, and a cache.

Everything a measure computes is on the folded network (App. C.1). `w` holds
every parameter (kernels and biases), ω = dim(w); the norm measures use the
kernels W_i of the d weight layers: every Conv2d and Linear, residual shortcut
projections and the last layer included (d = 3·depth + 1 for a NiN).
docs/measures.md, "Networks other than the NiN", has the choices made for
networks that are not a chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import polars as pl
import torch

from .network import Network, WeightLayer


@dataclass
class Settings:
    """Search budgets and choices, stored with every value in `measures.params`.
    `Settings.preset(name)` gives one of BUDGETS; the defaults are the "paper" budget."""
    seed: int = 0
    budget: str = "paper"            # the preset the search budgets started from
    spectral: str = "fft"            # "fft" (Sedghi et al. 2018) or "exact" (power iteration)
    power_iterations: int = 200
    target_deviation: float = 0.1    # accuracy drop that defines σ, σ', α, α' (App. E: d)
    tolerance: float = 0.01          # |deviation − target| accepted by the bisection
    bisection_steps: int = 12        # M1: log-scale bisection steps after the bracketing
    draws_min: int = 8               # M2: Monte Carlo draws per σ probe, at first, then
    draws: int = 1024                # more, up to this cap, until the standard error of the
    stderr_ratio: float = 0.25       # mean deviation is ≤ this × tolerance (at most 0.5)
    draw_examples: int = 128         # M3: training examples each draw is scored on (a seeded
                                     # subset; the full set when m ≤ this, or when 0)
    restarts: int = 2                # M2 of Algorithm 3: ascents per α probe (the first
                                     # from the worst perturbation found so far; with one,
                                     # α of search seed 2 of tests/tiny_model.py came out
                                     # 1.58x the others' on one CPU: past the 1.2 target)...
    confirm_restarts: int = 4        # ...and more, from random starts, where it would stop
                                     # (with 2, α' of search seed 0 of tests/tiny_model.py
                                     # in App. E's relative box stopped at 1.19x the
                                     # others', an ascent that missed: 1.42x in 1/α'²)
    ascent_steps: int = 10           # M4: gradient-ascent steps per restart
    ascent_batch: int = 2048         # examples per ascent step; the full set when m ≤ this
    ascent_lr: float = 0.5           # η_0: a step moves η_t of the radius (box: half-width),
                                     # η_t cosine-decayed from η_0 to η_0/10
    sigma_start: float = 0.1         # first σ tried; doubled or halved to bracket
    sigma_mag_start: float = 0.25    # first σ' (relative std)
    alpha_start: float = 1.0         # first α (ℓ2 radius)
    alpha_mag_start: float = 0.05    # first α' (relative half-width)
    eps: float = 1e-3                # ε of the magnitude-aware perturbations
    alpha_mag_box: str = "relative"  # α' searched in |u_i| ≤ α'|w_i| (App. E, "relative"),
                                     # or eq. 58's |u_i| ≤ α'|w_i| + ε ("eps"); ε stays in
                                     # the bounds (eqs. 59, 60) either way
    delta: float = 0.01              # δ of the bounds
    batch: int = 2048                # evaluation batch

    def __post_init__(self) -> None:
        def positive(x) -> bool:
            return isinstance(x, int | float) and math.isfinite(x) and 0 < x <= MAX_START

        def ints(name: str, low: int, high: int, note: str = "") -> tuple:
            rule = f"an integer in [{low:,}, {high:,}]{note}"
            return name, low <= getattr(self, name) <= high, rule

        every = " (0: every example)"
        problems = [f"{name} = {getattr(self, name)!r}: expected {rule}"
                    for name, ok, rule in (
            ("seed", 0 <= self.seed < MAX_SEED, f"an integer in [0, {MAX_SEED:,})"),
            ("spectral", self.spectral in SPECTRAL, f"one of {', '.join(SPECTRAL)}"),
            ("alpha_mag_box", self.alpha_mag_box in ALPHA_MAG_BOXES,
             f"one of {', '.join(ALPHA_MAG_BOXES)}"),
            ints("power_iterations", 1, MAX_ITERATIONS),
            *((name, positive(getattr(self, name)), f"a number in (0, {MAX_START:,.0f}]")
              for name in ("sigma_start", "sigma_mag_start", "alpha_start",
                           "alpha_mag_start", "ascent_lr", "eps")),
            ("delta", 0 < self.delta < 1, "a number in (0, 1)"),
            ints("batch", 1, MAX_EXAMPLES),
            ("target_deviation", 0 < self.target_deviation < 1, "a number in (0, 1)"),
            ("tolerance", 0 < self.tolerance < self.target_deviation,
             f"a number in (0, target_deviation = {self.target_deviation:g})"),
            ("stderr_ratio", 0 < self.stderr_ratio <= 0.5, "a number in (0, 0.5]"),
            ints("draws_min", 2, MAX_DRAWS),
            ("draws", self.draws_min <= self.draws <= MAX_DRAWS,
             f"an integer in [draws_min, {MAX_DRAWS:,}]"),
            ints("bisection_steps", 1, MAX_BISECTION_STEPS),
            ints("restarts", 1, MAX_RESTARTS),
            ints("confirm_restarts", 0, MAX_RESTARTS),
            ints("ascent_steps", 1, MAX_ITERATIONS),
            ints("draw_examples", 0, MAX_EXAMPLES, every),
            ints("ascent_batch", 0, MAX_EXAMPLES, every),
        ) if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def preset(cls, budget: str = "paper", **overrides) -> Settings:
        """The named search budget of BUDGETS, with any field overridden."""
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; budgets: {', '.join(BUDGETS)}")
        return cls(**{**BUDGETS[budget], **overrides, "budget": budget})

    @classmethod
    def parse(cls, budget: str, assignments: tuple[str, ...] | list[str] = (),
              **fixed) -> Settings:
        """A budget with NAME=VALUE overrides as a command line gives them
        (fgm-measure --budget B --set draws=2048). ValueError names what is wrong."""
        # the budget, the seed and the spectral method have options of their own
        types = {f.name: f.type for f in fields(cls)
                 if f.name not in ("budget", *fixed)}
        overrides = {}
        for item in assignments:
            name, eq, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if eq and name in fixed:
                raise ValueError(f"{item!r}: {name} has its own option (--{name}), "
                                 f"not --set")
            if not eq or name not in types:
                raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(sorted(types))}")
            kind = {"int": int, "float": float}.get(types[name], str)
            try:
                overrides[name] = kind(text.strip())
            except ValueError:
                raise ValueError(f"{item!r}: {name} takes a{'n' if kind is int else ''} "
                                 f"{kind.__name__}") from None
        return cls.preset(budget, **{**fixed, **overrides})


MAX_SEED = 10 ** 9          # a search's generator seeds are (seed·1000 + salt)·2²⁴ + draw
# Upper bounds of the --set values (README: Complexity measures), each far past any
# budget's (BUDGETS), so that a typo does not ask for years of searching:
MAX_BISECTION_STEPS = 64    # a bracket halved 64 times is below a double's resolution
MAX_DRAWS = 100_000         # Monte Carlo draws per σ probe ("thorough": 4,096)
MAX_RESTARTS = 1_000        # ascents per α probe, and confirming ones
MAX_ITERATIONS = 100_000    # power iterations; gradient-ascent steps per restart
MAX_EXAMPLES = 10_000_000   # batch, draw_examples, ascent_batch (datasets are smaller)
MAX_START = 1e6             # first σ, σ', α, α', the ascent's η_0 and ε
SPECTRAL = ("fft", "exact")
ALPHA_MAG_BOXES = ("relative", "eps")


# Search budgets by name, over the defaults above ("paper"): README, "Complexity
# measures", has them as a table; bench/measures.py shows what each costs and how
# far the searches' results move with it.
BUDGETS: dict[str, dict] = {
    "fast": {"draws": 256, "stderr_ratio": 0.5, "restarts": 1, "confirm_restarts": 1,
             "ascent_steps": 5},
    "paper": {},
    "thorough": {"draws": 4096, "stderr_ratio": 0.125, "restarts": 2, "confirm_restarts": 4,
                 "ascent_steps": 30, "bisection_steps": 20},
}


def measure_layout(x: torch.Tensor) -> torch.Tensor:
    """Images as the measures' convolutions run fastest on them: channels_last on a
    CPU, where a forward and backward of a narrow NiN on CIFAR-shaped inputs takes
    half the time (bench/measures.py; the same arithmetic, rounded differently); on
    a GPU as they are. No copy when they are already."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def memory_budget(device: torch.device) -> int:
    """Bytes a batched evaluation may use: a quarter of the free memory of a GPU,
    256 MiB on a CPU (where larger batches gain nothing)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return 256 * 2 ** 20


def graph_budget(device: torch.device) -> int:
    """Bytes the autograd graph of one forward-and-backward may hold: twice the
    batched evaluations' budget (512 MiB on a CPU, half the free memory of a GPU)."""
    return 2 * memory_budget(device)


@dataclass
class Context:
    net: Network
    x: torch.Tensor                      # training inputs (m, C, H, W), or (m, features)
    y: torch.Tensor
    num_classes: int
    init_w: torch.Tensor | None = None   # the initial weights, in net.w's layout
    epoch1_w: torch.Tensor | None = None # the weights after epoch 1, the same
    trace: pl.DataFrame | None = None
    outcome: dict = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    cache: dict = field(default_factory=dict)

    @classmethod
    def from_models(cls, final, x, y, num_classes, *, init=None, epoch1=None, trace=None,
                    outcome=None, settings=None) -> Context:
        """The folded network of `final` (traced on two training inputs), and the
        initial and epoch-1 weights of the same architecture in its layout."""
        for m in (final, init, epoch1):
            if m is not None:
                m.eval()
        laid = measure_layout(x)
        try:
            net = Network.from_module(final, laid[:2])
            x = laid
        except RuntimeError:
            if laid is x:
                raise
            # a model that cannot take channels_last activations (x.view(n, -1) after a
            # convolution): its inputs as they were
            net = Network.from_module(final, x[:2])
        return cls(net, x, y, num_classes,
                   net.weights_of(init) if init is not None else None,
                   net.weights_of(epoch1) if epoch1 is not None else None,
                   trace, outcome or {}, settings or Settings())

    # ------------------------------------------------------------------ basics
    @property
    def layers(self) -> list[WeightLayer]:
        return self.net.layers

    @property
    def m(self) -> int:
        return len(self.x)

    @property
    def d(self) -> int:
        """Every Conv2d and Linear of the folded network (shortcuts, last layer)."""
        return self.net.d

    @property
    def n(self) -> float:
        """The input's side n (n×n images): √(H·W) for an H×W input, 1 for a flat one."""
        if self.x.dim() < 4:
            return 1
        h, w = int(self.x.shape[-2]), int(self.x.shape[-1])
        return h if h == w else math.sqrt(h * w)

    @property
    def w0(self) -> torch.Tensor:
        if self.init_w is None:
            raise ValueError("needs the initial weights")
        return self.init_w

    @property
    def w_epoch1(self) -> torch.Tensor:
        if self.epoch1_w is None:
            raise ValueError("needs the weights after epoch 1")
        return self.epoch1_w

    def sizes(self) -> list[tuple[int, int] | None]:
        """Each layer's input (H, W) (None: a Linear)."""
        return self.net.input_sizes()

    def graph_batch(self) -> int:
        """Examples one forward-and-backward over the training set takes at once: the
        evaluation batch, fewer where the autograd graph of that many (a layer's
        input, output and mask per example) would pass graph_budget. A NiN on
        8x8 digits keeps the whole batch; a ResNet on 32x32 images takes ~150."""
        per = 12 * self.net.activation_floats(tuple(self.x.shape[1:]), total=True)
        return max(1, min(self.settings.batch, graph_budget(self.net.w.device) // per))

    def require_folded(self, what: str) -> None:
        """ValueError naming each BatchNorm that could not be folded (net.unfolded):
        with one, w is not every parameter of the network (γ, β stay outside it), so
        a measure defined on w, or on the layers' kernels, is not computed."""
        self.net.require_folded(what)

    def layer_params(self) -> dict:
        """How d counts (docs/measures.md, "Networks other than the NiN"): stored with
        each measure that uses d."""
        return {"d": self.d, "d_counts": "every_conv_and_linear",
                "shortcut_layers": sum(layer.shortcut for layer in self.layers)}

    def memo(self, key: str, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @torch.no_grad()
    def logits(self, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.net.w if w is None else w
        b = self.settings.batch
        return torch.cat([self.net.logits(w, self.x[i:i + b]) for i in range(0, self.m, b)])

    def accuracy(self, w: torch.Tensor | None = None) -> float:
        return (self.logits(w).argmax(1) == self.y).double().mean().item()

    def train_logits(self) -> torch.Tensor:
        return self.memo("logits", self.logits)

    def margin(self) -> float:
        """γ: the 10th percentile of f(X)[y] − max_{j≠y} f(X)[j] (signed)."""
        def compute():
            f = self.train_logits().double()
            true = f.gather(1, self.y[:, None]).squeeze(1)
            other = f.scatter(1, self.y[:, None], float("-inf")).max(dim=1).values
            return float(np.percentile((true - other).cpu().numpy(), 10))
        return self.memo("margin", compute)

    def generator(self, salt: int, draw: int | None = None) -> torch.Generator:
        """A seeded generator per search (salt), or per Monte Carlo draw of it."""
        seed = self.settings.seed * 1000 + salt
        if draw is not None:
            seed = (seed << 24) + draw
        return torch.Generator(device=self.net.w.device).manual_seed(seed)
