"""The perturbation searches of Appendix E: σ by Monte Carlo (Algorithm 2) and
α by gradient ASCENT with projection (Algorithm 3), both by bisection.

Each finds the largest scale whose perturbation lowers the training accuracy
by `target_deviation` (0.1) from the model's own, within `tolerance`. Every
budget used is returned with the value, to be stored in `measures.params`.

What makes the result reproducible across search seeds:
- σ, σ': common random numbers. Draw k is the same direction z_k at every
  σ tried (its own seeded generator), scaled by σ, so the estimated deviation
  is a smooth, all but monotone function of σ and bisection on it is well
  posed. Each probe adds draws until the estimate's standard error is at most
  stderr_ratio·tolerance (¼ by default: at ½, four seeds of a width-16 digits
  net ended 12% apart in 1/σ²), or its side of the target band is certain, up
  to a cap. Each draw is scored on
  its own seeded subset of `draw_examples` training examples (the paper's
  EstimateAccuracy samples minibatches too): per unit of compute that lowers
  the standard error several times more than scoring fewer draws on all.
- α, α': a strong ascent. Full-batch gradients where the training set fits
  in `ascent_batch`, a cosine step-size schedule, restarts, and a warm start
  from the worst perturbation found at the radii tried before. Every iterate's
  accuracy on the full training set is checked, and a probe stops early once
  one lies beyond the target band: a perturbation is a witness. Where the
  search would stop, `confirm_restarts` more ascents look for one.
- A search that does not converge within its budget returns the largest scale
  known to lie below the target (the safe side: a smaller σ or α only loosens
  a bound), with `converged: false` and the deviation reached there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context import Context, Settings, memory_budget

Z_CERTAIN = 3.0       # a probe is on one side of the target when this many standard errors away
MAX_EXPANSIONS = 30   # probes to bracket the target from the first scale
AIM = 0.75            # a search stops at a deviation within AIM·tolerance of the target;
AIM_ASCENT = 0.2      # an ascent's deviation has no sampling error: it can aim closer
COLLAPSED = 1.02      # a bracket this narrow without a probe in the band: re-probe lo


class NoSafeScale(ValueError):
    """Even the smallest scale tried lowers the accuracy by more than the target."""

    def __init__(self, message: str, deviation: float = math.nan):
        super().__init__(message)
        self.deviation = deviation


@dataclass
class Probe:
    """The deviation base − accuracy estimated at one scale."""
    scale: float
    deviation: float
    stderr: float = 0.0   # of the Monte Carlo mean; 0 for the ascent
    draws: int = 0        # Monte Carlo draws behind it; 0 for the ascent


def _side(p: Probe, s: Settings) -> int:
    """+1 above the band target ± tolerance, −1 below, 0 inside."""
    gap = p.deviation - s.target_deviation
    return 0 if abs(gap) <= s.tolerance else (1 if gap > 0 else -1)


def _accepts(p: Probe, s: Settings) -> bool:
    return _side(p, s) == 0 and p.stderr <= s.stderr_ratio * s.tolerance


def _interpolate(dev_lo: float, dev_hi: float, target: float) -> float:
    """Where between the bracket's ends (0: lo, 1: hi, in log scale) the target lies,
    if the deviation grows as a power of the scale (the line through the two ends
    on log-log axes); on a linear scale of deviation when the low end shows none."""
    if dev_lo > 0:
        return math.log(target / dev_lo) / math.log(dev_hi / dev_lo)
    return (target - dev_lo) / (dev_hi - dev_lo)


def _toward(p: Probe, last: Probe | None, target: float) -> float:
    """The next scale to bracket the target from p (last: the probe before it, on the
    same side): where the power law through the two (a line on log-log axes) meets
    the target, 1.01 to 2 times p's scale away; twice or half p's scale without one.
    (An ascent probe that stopped at a witness shows a deviation too low: hence
    at most 2x.)"""
    ratio = 2.0
    if last is not None and p.deviation > 0 and last.deviation > 0 \
            and p.deviation != last.deviation:
        power = math.log(p.deviation / last.deviation) / math.log(p.scale / last.scale)
        if power > 0:
            ratio = math.exp(min(max(abs(math.log(target / p.deviation)) / power,
                                     math.log(1.01)), math.log(2.0)))
    return p.scale * ratio if p.deviation < target else p.scale / ratio


def bisect(s: Settings, probe: Callable[..., Probe], start: float,
           floor: float = 0.0, aim: float = AIM) -> tuple[float, dict]:
    """Bracket the target from `start` (_toward), then shrink the bracket in log
    scale: each new scale is where the deviation, a power of the scale between the
    bracket's ends, meets the target (kept 5% inside), or the midpoint when one end
    has moved three times in a row (so the bracket keeps shrinking).

    Converged: a probe inside the band target ± tolerance whose standard error is
    ≤ stderr_ratio·tolerance. The search stops at one within aim·tolerance of the
    target; one farther out is kept while the search goes on (stopping anywhere in
    a band as wide as the tolerance would let seeds end at scales a few percent
    apart). Not converged within `bisection_steps`: the largest scale known to be
    below the target (Z_CERTAIN standard errors below it), `converged: False`.
    Below `floor` the perturbation no longer shrinks: halving stops there."""
    target = s.target_deviation
    lo = hi = accepted = safe = None
    scale, probes, expansions, steps, moved, reprobed = start, 0, 0, 0, [], set()
    again = False
    while True:
        p = probe(scale, again) if again else probe(scale)
        probes, again = probes + 1, False
        if _accepts(p, s) and (accepted is None or abs(p.deviation - target)
                               < abs(accepted.deviation - target)):
            accepted = p
        if accepted is not None and abs(accepted.deviation - target) <= aim * s.tolerance:
            break
        if p.deviation + Z_CERTAIN * p.stderr < target and (safe is None
                                                            or p.scale > safe.scale):
            safe = p
        if p.deviation > target:
            previous, hi = hi, p
            # the deviation grows with the scale: what was found at p, an ascent could
            # have found at any larger scale; probes there that showed less were wrong
            if lo is not None and lo.scale >= p.scale:   # (re-probed below)
                lo = None
            if safe is not None and safe.scale >= p.scale:
                safe = None
            if accepted is not None and accepted.scale >= p.scale \
                    and p.deviation > target + s.tolerance:
                accepted = None
        else:
            previous, lo = lo, p
        moved.append(p.deviation > target)
        if lo is None or hi is None:          # bracketing
            if expansions == MAX_EXPANSIONS or (lo is None and p.scale < floor):
                break
            expansions += 1
            scale = _toward(p, previous, target)
            continue
        if steps == s.bisection_steps:
            break
        steps += 1
        if hi.scale < lo.scale * COLLAPSED and lo.scale not in reprobed:
            # the deviation jumps over the whole band between two scales 2% apart: lo
            # may be wrong (an ascent weak there, which starts from hi's perturbation
            # now; a side taken on few draws): probe it again, precisely
            reprobed.add(lo.scale)
            scale, again = lo.scale, True
            continue
        t = _interpolate(lo.deviation, hi.deviation, target)
        if len(moved) >= 3 and moved[-1] == moved[-2] == moved[-3]:
            t = 0.5
        t = min(max(t, 0.05), 0.95)
        scale = lo.scale ** (1 - t) * hi.scale ** t
    if accepted is None and hi is None:
        raise ValueError(f"the training accuracy never dropped by {target} (reached "
                         f"{p.deviation:.3f} at scale {p.scale:g}); is the model trained?")
    if accepted is None and safe is None and lo is not None:
        # lo is below the target by its estimate only: halve it until a probe is
        # known to be (for the ascent, lo itself is: its deviation has no error)
        scale = lo.scale
        for _ in range(MAX_EXPANSIONS):
            scale /= 2
            p, probes = probe(scale), probes + 1
            if p.deviation + Z_CERTAIN * p.stderr < target:
                safe = p
                break
    final = accepted or safe
    if final is None:
        raise NoSafeScale(f"no scale was found to lower the training accuracy by less than "
                          f"{target} (the smallest tried, {p.scale:g}, lowered it by "
                          f"{p.deviation:.3f})", p.deviation)
    return final.scale, {
        "converged": accepted is not None, "reached_deviation": final.deviation,
        "deviation_stderr": final.stderr, "target_deviation": target,
        "tolerance": s.tolerance, "bisection_steps": s.bisection_steps,
        "bisection_steps_used": steps, "probes": probes,
        "expansions": expansions, "seed": s.seed, "budget": s.budget,
        **({"draws_used": final.draws} if final.draws else {})}


# --------------------------------------------------------------------------- σ, σ'

def noise_draws(ctx: Context, salt: int, first: int,
                count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draws first .. first+count−1: directions z_k ~ N(0, I) over the ω weights,
    (count, ω), and the training examples each is scored on, (count, draw_examples)
    (None: the whole set, when it is no larger). Draw k comes from its own
    generator, so it is the same whatever the scale or the batching."""
    w, s = ctx.net.w, ctx.settings
    subset = 0 < s.draw_examples < ctx.m
    z = torch.empty((count, w.numel()), dtype=w.dtype, device=w.device)
    idx = torch.empty((count, s.draw_examples), dtype=torch.long, device=w.device) \
        if subset else None
    for i in range(count):
        gen = ctx.generator(salt, draw=first + i)
        z[i] = torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype)
        if idx is not None:
            idx[i] = torch.randperm(ctx.m, generator=gen, device=w.device)[:s.draw_examples]
    return z, idx


def draws_at_once(ctx: Context, examples: int) -> int:
    """How many perturbed networks one batched forward evaluates, each on `examples`
    inputs: their weights, noise and activations (×3: a layer's input, output and
    ReLU) within the device's memory budget."""
    per_draw = 4 * (2 * ctx.net.omega + 3 * examples
                    * ctx.net.activation_floats(tuple(ctx.x.shape[1:])))
    return max(1, min(1024, memory_budget(ctx.net.w.device) // per_draw))


def perturbed_accuracies(ctx: Context, perturbations: torch.Tensor,
                         examples: torch.Tensor | None = None,
                         batched: bool | None = None) -> list[float]:
    """Training accuracy of w + u for each row u of a (B, ω) stack: on all examples,
    or on row b of `examples` (B, k) for perturbation b. batched: as few grouped
    forwards as memory allows (Network.logits_many); False: one forward per row,
    the reference the batched path is tested against; None: batched on a GPU only
    (on a CPU, grouped convolutions measured no faster, often slower: bench/measures.py)."""
    w = ctx.net.w
    if batched is None:
        batched = w.device.type != "cpu"
    if not batched:
        if examples is None:
            return [ctx.accuracy(w + u) for u in perturbations]
        with torch.no_grad():
            return [(ctx.net.logits(w + u, ctx.x[i]).argmax(1) == ctx.y[i]).double().mean().item()
                    for u, i in zip(perturbations, examples, strict=True)]
    out: list[float] = []
    with torch.no_grad():
        if examples is not None:
            step = draws_at_once(ctx, examples.shape[1])
            for c in range(0, len(perturbations), step):
                idx = examples[c:c + step]
                logits = ctx.net.logits_many(w + perturbations[c:c + step], ctx.x[idx])
                out += (logits.argmax(2) == ctx.y[idx]).double().mean(1).tolist()
            return out
        batch = min(ctx.settings.batch, ctx.m)
        step = draws_at_once(ctx, batch)
        for c in range(0, len(perturbations), step):
            ws = w + perturbations[c:c + step]
            correct = torch.zeros(len(ws), dtype=torch.float64, device=w.device)
            for i in range(0, ctx.m, batch):
                logits = ctx.net.logits_many(ws, ctx.x[i:i + batch])
                correct += (logits.argmax(2) == ctx.y[i:i + batch]).sum(1)
            out += (correct / ctx.m).tolist()
    return out


def sigma_search(ctx: Context, magnitude: bool,
                 batched: bool | None = None) -> tuple[float, dict]:
    """Algorithm 2. Noise N(0, σ²) on every weight, or with magnitude=True the
    per-weight std √(σ'² w_i² + ε²). The expected accuracy is a mean over the
    common draws z_1, z_2, ...: at least `draws_min` of them, more until the
    standard error of the mean is ≤ stderr_ratio·tolerance or, outside the band,
    Z_CERTAIN standard errors from the target, at most `draws`. `forward_passes`
    in params: the draws scored, each on `examples_per_draw` examples. batched:
    the draws of a probe scored by grouped forwards (perturbed_accuracies); the
    same values as one forward per draw (batched=False); None: on a GPU only."""
    ctx.require_folded("the σ' search" if magnitude else "the σ search")
    s = ctx.settings
    w = ctx.net.w
    base = ctx.accuracy()
    salt = 2 if magnitude else 1
    per_draw = min(s.draw_examples, ctx.m) if s.draw_examples > 0 else min(s.batch, ctx.m)
    if batched is None:
        batched = w.device.type != "cpu"
    chunk = draws_at_once(ctx, per_draw) if batched else max(1, min(16, 2 ** 25 // w.numel()))
    passes = 0

    def probe(sigma: float, again: bool = False) -> Probe:
        nonlocal passes
        std = torch.sqrt(sigma ** 2 * w ** 2 + s.eps ** 2) if magnitude else sigma
        accs: list[float] = []
        n = min(s.draws_min, s.draws)
        while True:
            while len(accs) < n:
                z, examples = noise_draws(ctx, salt, len(accs), min(chunk, n - len(accs)))
                accs += perturbed_accuracies(ctx, std * z, examples, batched)
            acc = torch.tensor(accs, dtype=torch.float64)
            p = Probe(sigma, base - float(acc.mean()),
                      float(acc.std() / math.sqrt(n)) if n > 1 else math.inf, n)
            # precise enough to accept or reject it; or, outside the band, to be sure
            # of its side of the target (all the bracket needs). The deviation of a
            # draw is skewed (a few directions do much harm): a handful of draws
            # misses them, and their standard error too, so near the target a side
            # takes 4·draws_min draws at least. Asked `again`: precise in any case.
            gap = abs(p.deviation - s.target_deviation)
            goal = s.stderr_ratio * s.tolerance
            if gap > s.tolerance and not again and (n >= 4 * s.draws_min
                                                    or gap > 3 * s.tolerance):
                goal = max(goal, gap / Z_CERTAIN)
            if p.stderr <= goal or n >= s.draws:
                passes += n
                return p
            # as many draws as that stderr asks for, at most 4x at a time (a few
            # draws' standard error is itself rough)
            needed = math.ceil(1.2 * n * (p.stderr / goal) ** 2)
            n = min(max(needed, n + s.draws_min), 4 * n, s.draws)

    start = "sigma_mag_start" if magnitude else "sigma_start"
    sigma, params = bisect(s, probe, getattr(s, start))
    return sigma, dict(params, **{start: getattr(s, start)}, draws=s.draws, draws_min=s.draws_min,
                       stderr_ratio=s.stderr_ratio, draw_examples=s.draw_examples,
                       examples_per_draw=min(s.draw_examples, ctx.m) if s.draw_examples > 0
                       else ctx.m, forward_passes=passes,
                       model_accuracy=base, magnitude_aware=magnitude,
                       eps=s.eps if magnitude else None)


# --------------------------------------------------------------------------- α, α'

def project_ball(u: torch.Tensor, radius: float) -> torch.Tensor:
    norm = u.norm()
    return u * (radius / norm) if norm > radius else u


def project_box(u: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(u, half_width), -half_width)


def ascent_rate(s: Settings, step: int) -> float:
    """η_t: cosine decay from ascent_lr to ascent_lr/10 over the ascent steps."""
    frac = step / max(s.ascent_steps - 1, 1)
    return s.ascent_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Ascent:
    """Projected gradient ASCENT on the training cross-entropy inside the set of
    radius α: the ℓ2 ball ‖u‖ ≤ α, or with magnitude=True the box |u_i| ≤ α|w_i| (App. E;
    |u_i| ≤ α|w_i| + ε, eq. 58's box, with the setting alpha_mag_box = "eps").
    Remembers the worst perturbation found, as a fraction of its set, to start the
    next radius from it."""

    def __init__(self, ctx: Context, magnitude: bool, gen: torch.Generator,
                 batched: bool | None = None):
        self.ctx, self.magnitude, self.gen = ctx, magnitude, gen
        s = ctx.settings
        self.batch = ctx.m if s.ascent_batch <= 0 else min(s.ascent_batch, ctx.m)
        self.full = self.batch == ctx.m
        self.best: torch.Tensor | None = None   # worst u found so far, divided by its set's size
        self.gradients = self.passes = 0
        # restarts run side by side (one grouped forward and backward per step) on a
        # GPU; on a CPU grouped convolutions are no faster than one after another
        self.batched = ctx.net.w.device.type != "cpu" if batched is None else batched

    def _size(self, alpha: float) -> torch.Tensor | float:
        w = self.ctx.net.w
        if not self.magnitude:
            return alpha
        s = self.ctx.settings
        return alpha * w.abs() + s.eps if s.alpha_mag_box == "eps" else alpha * w.abs()

    def _gradient(self, u: torch.Tensor, step: int = 0, picks: list | None = None
                  ) -> tuple[Callable[[], torch.Tensor], list[float] | None]:
        """The gradient of the training cross-entropy at w + u, for u one perturbation
        (ω,) or a stack of them (B, ω) (each row's own loss: logits_many), as a call
        (made only when the step is taken), and each one's accuracy on the full
        training set when the ascent is full-batch (None: a minibatch, `picks[row]
        [step]` its examples for a stack, drawn here for one). Full-batch, the set
        goes through in evaluation batches, each one's gradient added up, so memory
        stays that of one batch however large the set. A stack goes through in
        groups of rows that fit the device's memory budget."""
        group = self.rows_at_once()
        if u.dim() == 2 and len(u) > group:
            # each group's gradient at once (its graph freed before the next group's)
            grads, accs = [], []
            for r in range(0, len(u), group):
                gradient, part = self._gradient(u[r:r + group], step,
                                                picks[r:r + group] if picks else None)
                grads.append(gradient())
                accs += part or []
            return (lambda: torch.cat(grads)), (accs if self.full else None)
        ctx = self.ctx
        u = u.detach().requires_grad_(True)
        many = u.dim() == 2
        rows = len(u) if many else 1
        if not self.full:
            if many:
                idx = torch.stack([p[step] for p in picks[:len(u)]])
            else:
                idx = torch.randint(0, ctx.m, (self.batch,), generator=self.gen,
                                    device=ctx.x.device)
            piece, n = max(1, ctx.graph_batch() // rows), idx.shape[-1]
            if n <= piece:
                loss = self._loss(u, ctx.x[idx], ctx.y[idx])
                return (lambda: torch.autograd.grad(loss, u)[0]), None

            def pieces() -> torch.Tensor:   # a minibatch whose graph would not fit at once
                g = torch.zeros_like(u)
                for i in range(0, n, piece):
                    part = idx[..., i:i + piece]
                    loss = self._loss(u, ctx.x[part], ctx.y[part])
                    g += torch.autograd.grad(loss * (part.shape[-1] / n), u)[0]
                return g
            return pieces, None
        chunk = max(1, ctx.graph_batch() // rows)
        if chunk >= ctx.m:   # one piece: the backward only if the step is taken
            loss, logits = self._loss(u, ctx.x, ctx.y, with_logits=True)
            correct = (logits.argmax(-1) == ctx.y).sum(-1).reshape(rows).double()
            return (lambda: torch.autograd.grad(loss, u)[0]), (correct / ctx.m).tolist()
        g, correct = torch.zeros_like(u), torch.zeros(rows, dtype=torch.float64,
                                                        device=u.device)
        for i in range(0, ctx.m, chunk):
            x, y = ctx.x[i:i + chunk], ctx.y[i:i + chunk]
            loss, logits = self._loss(u, x, y, with_logits=True)
            g += torch.autograd.grad(loss * (len(y) / ctx.m), u)[0]
            correct += (logits.argmax(-1) == y).sum(-1).reshape(rows)
        return (lambda: g), (correct / ctx.m).tolist()

    def rows_at_once(self) -> int:
        """Perturbations one grouped forward and backward takes: what the autograd
        graph of each (a layer's input, output and ReLU mask per example) leaves room
        for in the device's memory budget, at least 1."""
        ctx = self.ctx
        examples = min(ctx.settings.batch, ctx.m) if self.full else self.batch
        per_row = 4 * 3 * examples * ctx.net.activation_floats(tuple(ctx.x.shape[1:]),
                                                               total=True)
        return max(1, memory_budget(ctx.net.w.device) // per_row)

    def _loss(self, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              with_logits: bool = False):
        """The mean cross-entropy at w + u on (x, y); a stack u (B, ω): the sum over
        rows of each row's mean (x, y one set for all rows, or (B, n, ...) one per row)."""
        net, w = self.ctx.net, self.ctx.net.w
        if u.dim() == 1:
            logits = net.logits(w + u, x)
            loss = F.cross_entropy(logits, y)
        else:
            logits = net.logits_many(w + u, x)
            target = y.expand(len(u), *y.shape[-1:])
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1).sum()
        return (loss, logits.detach()) if with_logits else loss

    def worst_accuracy(self, alpha: float, stop_below: float = -1.0,
                       restarts: int | None = None, warm: bool = True) -> float:
        """The lowest full-training-set accuracy found inside the set of radius α by
        `restarts` ascents (the first from the worst perturbation so far, if `warm`).
        Stops as soon as one is below `stop_below` (that alone decides the probe)."""
        s, w = self.ctx.settings, self.ctx.net.w
        restarts = s.restarts if restarts is None else restarts
        if self.batched and restarts > 1:
            state = self.gen.get_state()
            try:
                return self._worst_side_by_side(alpha, stop_below, restarts, warm)
            except torch.OutOfMemoryError:
                # one after another needs a restart's memory only (and gives the same)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.gen.set_state(state)
                self.batched = False
        size = self._size(alpha)
        worst, worst_u = float("inf"), None

        def seen(acc: float, u: torch.Tensor) -> bool:
            nonlocal worst, worst_u
            if acc < worst:
                worst, worst_u = acc, u.detach().clone()
            return worst < stop_below

        for restart in range(restarts):
            u = self._start(restart, warm, alpha, size)
            done = False
            for step in range(s.ascent_steps):
                gradient, acc = self._gradient(u)
                if acc is not None and seen(acc[0], u):  # full batch: every iterate checked
                    done = True
                    break
                g = gradient()
                self.gradients += 1
                with torch.no_grad():   # ASCENT: up the loss, then back into the set
                    eta = ascent_rate(s, step)
                    if self.magnitude:
                        u = project_box(u + eta * size * g.sign(), size)
                    else:
                        u = project_ball(u + eta * alpha * g / g.norm().clamp_min(1e-30), alpha)
            if not done:
                self.passes += 1
                done = seen(self.ctx.accuracy(w + u.detach()), u)
            if done:
                break
        if worst_u is not None and (warm or worst < stop_below):
            self.best = self._fraction(worst_u, size)
        return worst

    @staticmethod
    def _fraction(u: torch.Tensor, size: torch.Tensor | float) -> torch.Tensor:
        """u as a fraction of its set's size; 0 where the box has no width (a zero
        weight in the relative box |u_i| ≤ α|w_i|, where u_i is 0 too)."""
        if isinstance(size, torch.Tensor):
            return torch.where(size > 0, u / size.clamp_min(1e-38), torch.zeros_like(u))
        return u / size

    def _start(self, restart: int, warm: bool, alpha: float,
               size: torch.Tensor | float) -> torch.Tensor:
        """Where a restart begins: the worst perturbation so far (the first, if warm),
        else uniform noise inside the set, off the flat minimum (App. E)."""
        w = self.ctx.net.w
        if restart == 0 and warm and self.best is not None:
            return (project_box(self.best * size, size) if self.magnitude
                    else project_ball(self.best * alpha, alpha))
        r = torch.rand(w.shape, generator=self.gen, device=w.device, dtype=w.dtype) * 2 - 1
        return r * size if self.magnitude else r * alpha / w.numel() ** 0.5

    def _worst_side_by_side(self, alpha: float, stop_below: float, restarts: int,
                            warm: bool) -> float:
        """worst_accuracy with the restarts run side by side: each step one grouped
        forward and backward (Network.logits_many) for all of them. The same value,
        perturbation kept, counts and generator state as running them one after
        another, which stops at the first restart that finds an accuracy below
        `stop_below`: restart r's outcome is used only if restarts 0..r−1 found none,
        so the side-by-side run stops early only when restart 0 finds one, and a
        restart beyond the first that found one is dropped."""
        ctx, s = self.ctx, self.ctx.settings
        w, size, steps = ctx.net.w, self._size(alpha), s.ascent_steps
        # every restart's random numbers, in the order one after another draws them,
        # and the generator's state after each restart's (restored at the end)
        starts, picks, after = [], [], []
        for r in range(restarts):
            starts.append(self._start(r, warm, alpha, size))
            picks.append(None if self.full else [
                torch.randint(0, ctx.m, (self.batch,), generator=self.gen, device=w.device)
                for _ in range(steps)])
            after.append(self.gen.get_state())
        u = torch.stack(starts)
        lowest = [math.inf] * restarts           # each restart's lowest accuracy, up to
        lowest_u: list[torch.Tensor | None] = [None] * restarts   # its first witness
        witness = [False] * restarts
        grads = [steps] * restarts               # gradient steps each would take

        def seen(r: int, acc: float, row: torch.Tensor) -> None:
            if not witness[r] and acc < lowest[r]:
                lowest[r], lowest_u[r] = acc, row.detach().clone()
            witness[r] = witness[r] or acc < stop_below

        live = restarts                          # restarts 0..live−1 still matter
        for step in range(steps):
            v = u[:live]
            gradient, accs = self._gradient(v, step, picks)
            if accs is not None:   # every iterate checked, as one after another does
                for r, acc in enumerate(accs):
                    if not witness[r]:
                        seen(r, acc, v[r])
                        if witness[r]:
                            grads[r] = step
                first = next((r for r in range(live) if witness[r]), None)
                if first == 0:
                    break
                if first is not None:   # it and those after it take no more steps
                    live = first
            g = gradient()
            with torch.no_grad():
                eta = ascent_rate(s, step)
                v, g = v.detach()[:live], g[:live]   # (live may have shrunk this step)
                if self.magnitude:
                    v = project_box(v + eta * size * g.sign(), size)
                else:
                    norms = g.norm(dim=1, keepdim=True).clamp_min(1e-30)
                    v = project_rows(v + eta * alpha * g / norms, alpha)
                u = v
        else:
            # the last iterate of each restart that found no witness in the loop
            rest = [r for r in range(live) if not witness[r]]
            accs = perturbed_accuracies(ctx, u[rest], None, batched=True) if rest else []
            for r, acc in zip(rest, accs, strict=True):
                seen(r, acc, u[r])
        # what one restart after another would have run: up to the first witness
        last = next((r for r in range(restarts) if witness[r]), restarts - 1)
        self.gen.set_state(after[last])
        self.gradients += sum(grads[:last + 1])
        self.passes += sum(grads[r] == steps for r in range(last + 1))
        worst, worst_u = math.inf, None
        for r in range(last + 1):
            if lowest[r] < worst:
                worst, worst_u = lowest[r], lowest_u[r]
        if worst_u is not None and (warm or worst < stop_below):
            self.best = self._fraction(worst_u, size)
        return worst


def project_rows(u: torch.Tensor, radius: float) -> torch.Tensor:
    """project_ball on each row of a (B, ω) stack."""
    norms = u.norm(dim=1, keepdim=True)
    return torch.where(norms > radius, u * (radius / norms), u)


def worst_accuracy(ctx: Context, alpha: float, magnitude: bool, gen: torch.Generator) -> float:
    """The lowest training accuracy gradient ascent finds inside the set of radius α
    (a fresh ascent, no warm start)."""
    return Ascent(ctx, magnitude, gen).worst_accuracy(alpha)


def alpha_search(ctx: Context, magnitude: bool,
                 batched: bool | None = None) -> tuple[float, dict]:
    """Algorithm 3, with gradient ascent on the cross-entropy as the surrogate.
    batched: a probe's restarts run side by side (Ascent); the same value and params
    as one after another (batched=False); None: on a GPU only."""
    ctx.require_folded("the α' search" if magnitude else "the α search")
    s = ctx.settings
    base = ctx.accuracy()
    ascent = Ascent(ctx, magnitude, ctx.generator(4 if magnitude else 3), batched)
    # an accuracy below this is a perturbation beyond the band: it decides the probe
    above = base - s.target_deviation - s.tolerance

    def probe(alpha: float, again: bool = False) -> Probe:
        # again: as any probe, the ascent starting from the worst perturbation so far
        worst = ascent.worst_accuracy(alpha, stop_below=above)
        if abs(base - worst - s.target_deviation) <= AIM_ASCENT * s.tolerance:
            # where the search would stop: look harder for a perturbation beyond the band
            worst = min(worst, ascent.worst_accuracy(alpha, stop_below=above,
                                                     restarts=s.confirm_restarts, warm=False))
        return Probe(alpha, base - worst)

    start = "alpha_mag_start" if magnitude else "alpha_start"
    eps_box = magnitude and s.alpha_mag_box == "eps"
    # the box |u_i| ≤ α'|w_i| + ε is the ε-box, to 1%, once α'·max|w_i| < ε/100; the
    # relative box (App. E) shrinks to w itself, so some α' is always safe
    floor = s.eps / 100 / float(ctx.net.w.abs().max()) if eps_box else 0.0
    try:
        alpha, params = bisect(s, probe, getattr(s, start), floor, AIM_ASCENT)
    except NoSafeScale as exc:
        if not eps_box:
            raise
        raise NoSafeScale(f"even the smallest box, |u_i| ≤ ε = {s.eps:g}, lowers the "
                          f"training accuracy by {exc.deviation:.3f}, more than "
                          f"{s.target_deviation}: α' is not defined for this model (the "
                          f"ε-box's corners lie {s.eps * ctx.net.omega ** 0.5:.3g} from w "
                          "in ℓ2)") from None
    return alpha, dict(params, **{start: getattr(s, start)}, restarts=s.restarts,
                       confirm_restarts=s.confirm_restarts, ascent_steps=s.ascent_steps,
                       ascent_batch=s.ascent_batch, ascent_batch_used=ascent.batch,
                       ascent_lr=s.ascent_lr, gradient_steps=ascent.gradients,
                       accuracy_passes=ascent.passes, model_accuracy=base,
                       magnitude_aware=magnitude, eps=s.eps if magnitude else None,
                       alpha_mag_box=s.alpha_mag_box if magnitude else None)
