"""The device data path and mixed precision (issue #12): CPU training bytes as before,
uint8 data normalised where they lie, out-of-memory retries, and the CUDA path
(skipped without a GPU)."""

import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fgm.train.loop as train_loop_module
from fgm.measures.context import Context, Settings
from fgm.measures.registry import MeasureSpec
from fgm.measures.runner import run_one
from fgm.measures.search import alpha_search, noise_draws, perturbed_accuracies, sigma_search
from fgm.train.cli import main as train_cli
from fgm.train.data import Data, _make, load_digits, normalised
from fgm.train.grid import Config
from fgm.train.loop import evaluate, safe_steps, train_one
from fgm.train.nin import NiN
from fgm.warehouse import connect

TRAIN = {"stop_cross_entropy": 0.01, "max_steps": 120, "lr_drop_steps": [60],
         "lr_drop_factor": 0.1, "estimate_batches": 10, "trace_every": 50}


def plain_training(config: Config, data: Data, train: dict, seed: int) -> tuple[dict, dict]:
    """The CPU training loop as it was before the device path (issue #12, commit
    00d865f), cut to what decides the weights: seeded NiN and batch order, the
    learning-rate schedule, one fp32 step a batch, each loss read back at once, and
    the stop rule's full-set check in eval mode. Returns the final state and
    {steps, converged}. It runs here, beside train_one, on the same CPU and threads: the
    two must give the same bytes, whatever this CPU's math library rounds to."""
    torch.manual_seed(seed)
    v = config.values
    model = NiN(data.shape[0], data.num_classes, int(v["width"]), int(v["depth"]),
                float(v["dropout"]))
    lr, wd = float(v["learning_rate"]), float(v["weight_decay"])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    assert v["optimizer"] == "sgd"
    threshold, window = float(train["stop_cross_entropy"]), int(train["estimate_batches"])
    batch, m = int(v["batch_size"]), len(data.x_train)
    steps_per_epoch = -(-m // batch)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    recent: list[float] = []
    step, last_check_epoch, converged = 0, -1, False
    model.train()
    while step < train["max_steps"] and not converged:
        order = torch.randperm(m, generator=gen)
        for i in range(0, m, batch):
            for group in optimizer.param_groups:
                group["lr"] = lr * train["lr_drop_factor"] ** sum(
                    step >= s for s in train["lr_drop_steps"])
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            recent = (recent + [loss.item()])[-window:]
            estimate, epoch = sum(recent) / len(recent), step // steps_per_epoch
            if len(recent) == window and (estimate <= threshold or (
                    estimate <= 5 * threshold and epoch > last_check_epoch)):
                last_check_epoch = epoch
                if evaluate(model, data.x_train, data.y_train)[0] <= threshold:
                    converged = True
                    break
            if step >= train["max_steps"]:
                break
    state = {k: t.detach().clone().contiguous() for k, t in model.state_dict().items()}
    return state, {"steps": step, "converged": converged}


def small_data() -> Data:
    d = load_digits()
    return Data("digits", d.x_train[:300], d.y_train[:300], d.x_test[:100], d.y_test[:100],
                10, d.info)


def config(dropout: float) -> Config:
    values = {"width": 16, "depth": 2, "dropout": dropout, "batch_size": 32,
              "optimizer": "sgd", "learning_rate": 0.05, "weight_decay": 0.0}
    return Config(values, {a: 0 for a in values})


def state_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_cpu_training_gives_the_same_bytes_as_before_the_device_path(dropout):
    """On a CPU, train_one (fp32 by default, losses read every step) trains exactly as
    the plain loop before issue #12 did: compared on this machine, not with hashes
    taken once on another CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = train_one(config(dropout), small_data(), TRAIN, 3, torch.device("cpu"))
        state, outcome = plain_training(config(dropout), small_data(), TRAIN, 3)
    finally:
        torch.set_num_threads(threads)
    assert r.timing["precision"] == "fp32"
    assert {k: r.outcome[k] for k in outcome} == outcome
    assert sorted(r.final_state) == sorted(state)
    assert state_hash(r.final_state) == state_hash(state)


# converges (the stop rule's check falls due and passes) well inside the budget
CONVERGING = {"stop_cross_entropy": 0.05, "max_steps": 600, "lr_drop_steps": [10 ** 6],
              "lr_drop_factor": 0.1, "estimate_batches": 10, "trace_every": 7}


def converging_config() -> Config:
    values = {"width": 16, "depth": 2, "dropout": 0.0, "batch_size": 16,
              "optimizer": "adam", "learning_rate": 3e-3, "weight_decay": 0.0}
    return Config(values, {a: 0 for a in values})


@pytest.mark.parametrize("sync_every", [3, 16, 64])
def test_reading_losses_back_in_batches_gives_the_same_training(sync_every):
    """A GPU reads the minibatch losses back every few steps, not every step; the
    trace, the stop rule's checks and the weights must not change."""
    d = load_digits()
    data = Data("digits", d.x_train[:80], d.y_train[:80], d.x_test[:40], d.y_test[:40], 10, {})
    seen = {}
    for every in (1, sync_every):
        steps: list = []
        r = train_one(converging_config(), data, CONVERGING, 0, torch.device("cpu"),
                      on_step=lambda step, est, into=steps: into.append((step, est)),
                      sync_every=every)
        seen[every] = (r, steps)
    (ref, ref_steps), (got, got_steps) = seen[1], seen[sync_every]
    assert ref.outcome["converged"] and ref.outcome["stop_checks"] >= 1   # the case that matters
    assert got.outcome == ref.outcome
    assert [{k: v for k, v in t.items() if k != "seconds"} for t in got.trace] == \
        [{k: v for k, v in t.items() if k != "seconds"} for t in ref.trace]
    assert got_steps == ref_steps and [s for s, _ in got_steps] == list(
        range(1, ref.outcome["steps"] + 1))
    assert state_hash(got.final_state) == state_hash(ref.final_state)
    assert state_hash(got.epoch1_state) == state_hash(ref.epoch1_state)
    assert ref.timing["loss_reads"] == ref.outcome["steps"]
    assert got.timing["loss_reads"] < ref.timing["loss_reads"] / 2   # and fewer reads


def test_safe_steps_never_skips_a_step_whose_check_could_fall_due():
    # random histories and bounds: a step it calls safe has a running mean above its
    # bound whatever the losses that follow (the worst case: all of them 0), and the
    # first step it does not call safe can be due
    gen = np.random.default_rng(0)
    for _ in range(300):
        window = int(gen.integers(2, 8))
        bounds = list(gen.choice([0.2, 1.0], size=10))
        recent = list(gen.uniform(0, 3, size=int(gen.integers(0, window + 1))))
        h = safe_steps(recent, window, bounds)
        assert 0 <= h <= 10
        for j in range(1, h + 1):
            after = (recent + [0.0] * j)[-window:]
            assert len(after) < window or sum(after) / window > bounds[j - 1]
        if h < 10:
            after = (recent + [0.0] * (h + 1))[-window:]
            assert len(after) == window and sum(after) / window <= bounds[h]
    assert safe_steps([5.0] * 4, 4, [1.0] * 8) == 3     # 3 of 4 old losses keep it above 1
    assert safe_steps([], 10, [1.0] * 8) == 8           # no full window for 8 steps yet
    with pytest.raises(ValueError, match="sync_every"):
        train_one(converging_config(), small_data(), CONVERGING, 0, torch.device("cpu"),
                  sync_every=0)


def test_image_data_are_kept_as_uint8_and_normalise_to_the_same_floats():
    d = load_digits()
    x_u8, xt_u8, mean, std = d.raw
    assert x_u8.dtype == torch.uint8 and x_u8.shape == d.x_train.shape
    assert torch.equal(normalised(x_u8, mean, std), d.x_train)
    assert torch.equal(normalised(xt_u8, mean, std), d.x_test)
    # pixels that are not integers 0..255: no uint8 copy
    rng = np.random.default_rng(0)
    floats = _make("f", rng.random((4, 2, 2, 1)), np.zeros(4), rng.random((2, 2, 2, 1)),
                   np.zeros(2), num_classes=2, source="test")
    assert floats.raw is None
    # a cut training set no longer matches its uint8 images: those are not used
    cut = Data(d.name, d.x_train[:10], d.y_train[:10], d.x_test, d.y_test, 10, d.info, d.raw)
    assert not cut._raw_matches()


class OutOfMemoryAbove(nn.Module):
    """A model that runs out of memory on batches larger than `limit`, `times` times."""

    def __init__(self, inner: nn.Module, limit: int, times: int):
        super().__init__()
        self.inner, self.limit, self.times, self.sizes = inner, limit, times, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit and self.times > 0:
            self.times -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.inner(x)


def test_measures_on_a_cpu_run_on_channels_last_images_and_give_the_same_values():
    """CIFAR-shaped inputs go channels_last for the measures on a CPU (twice as fast
    there); every measure that does not search gives what plain NCHW images give."""
    import dataclasses

    from fgm.measures import list_measures
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(96, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (96,), generator=gen)
    torch.manual_seed(4)
    nets = [NiN(3, 10, 16, 2) for _ in range(3)]
    ctx = Context.from_models(nets[0], x, y, 10, init=nets[1], epoch1=nets[2],
                              settings=Settings(batch=40))
    assert ctx.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ctx.x, x)                                  # the same numbers
    plain = dataclasses.replace(ctx, x=x.contiguous(), cache={})
    assert not plain.x.is_contiguous(memory_format=torch.channels_last)
    again = Context.from_models(nets[0], ctx.x, y, 10)
    assert again.x.data_ptr() == ctx.x.data_ptr()                # no copy the second time
    compared = 0
    for spec in list_measures():
        if spec.family in ("sharpness", "pac_bayes") or "flatness" in spec.name:
            continue                                              # searches: tested apart
        a, b = run_one(spec, ctx), run_one(spec, plain)
        assert a[1] == b[1], spec.name
        if a[1] == "ok":
            assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-6), spec.name
            compared += 1
    assert compared >= 20


def test_evaluation_out_of_memory_retries_once_with_a_quarter_of_the_batch():
    data = small_data()
    net = NiN(1, 10, 8, 1)
    expected = evaluate(net, data.x_train, data.y_train, batch=50)
    flaky = OutOfMemoryAbove(net, limit=100, times=1)
    got = evaluate(flaky, data.x_train, data.y_train, batch=256)
    assert got == pytest.approx(expected, rel=1e-6)
    assert flaky.sizes[0] == 256 and max(flaky.sizes[1:]) == 64
    stubborn = OutOfMemoryAbove(net, limit=10, times=2)
    with pytest.raises(torch.OutOfMemoryError):
        evaluate(stubborn, data.x_train, data.y_train, batch=256)
    assert stubborn.sizes == [256, 64] and stubborn.training


def test_a_measure_out_of_memory_retries_with_a_smaller_batch_then_fails_alone():
    d = small_data()
    ctx = Context.from_models(NiN(1, 10, 8, 1), d.x_train, d.y_train, 10,
                              settings=Settings(batch=256))
    calls = []

    def needs_small_batches(ctx):
        calls.append(ctx.settings.batch)
        if ctx.settings.batch > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return ctx.accuracy()

    spec = MeasureSpec("probe", "-", "test", ("final",), needs_small_batches, "")
    value, status, error, _ = run_one(spec, ctx)
    assert status == "ok" and calls == [256, 64]
    assert value == pytest.approx(float((ctx.train_logits().argmax(1) == d.y_train)
                                        .double().mean()))

    def always(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    value, status, error, _ = run_one(MeasureSpec("oom", "-", "test", ("final",), always, ""),
                                      ctx)
    assert value is None and status == "failed" and "OutOfMemoryError" in error


def test_a_model_out_of_memory_is_stored_as_failed_and_the_grid_goes_on(
        tmp_path, grid_file, monkeypatch):
    real = train_loop_module.train_one
    seen = []

    def first_runs_out(config, *args, **kwargs):
        seen.append(config.hash)
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(train_loop_module, "train_one", first_runs_out)
    db = tmp_path / "w.duckdb"
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--set", "width=16,12",
                                         "--set", "depth=1", "--out", str(tmp_path / "runs"),
                                         "--db", str(db), "--device", "cpu", "--no-measures"])
    # the grid goes on; the run's exit status says a model failed (as fgm-ingest's does)
    assert out.exit_code == 1, out.output
    assert "FAILED" in out.output and "out of device memory" in out.output
    assert "stored as failed; run again to retry them" in out.output
    con = connect(db, read_only=True)
    try:
        rows = con.sql("SELECT status, count(*) FROM models GROUP BY status").fetchall()
    finally:
        con.close()
    assert dict(rows) == {"failed": 1, "done": len(seen) - 1} and len(seen) >= 2


def test_bf16_training_on_cpu_stores_fp32_losses_and_a_bad_precision_is_refused():
    data = small_data()
    r = train_one(config(0.0), data, TRAIN, 3, torch.device("cpu"), precision="bf16")
    assert r.timing["precision"] == "bf16"
    net = NiN(1, 10, 16, 2)
    net.load_state_dict(r.final_state)
    loss, acc = evaluate(net, data.x_train, data.y_train)   # fp32, from the stored weights
    assert r.outcome["train_loss"] == pytest.approx(loss, rel=1e-6)
    assert r.outcome["train_acc"] == acc
    with pytest.raises(ValueError, match="precision 'fp16'"):
        train_one(config(0.0), data, TRAIN, 3, torch.device("cpu"), precision="fp16")


def test_a_grid_refuses_an_unknown_precision(grid_file, tmp_path):
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--precision",
                                         "fp8", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "--precision" in out.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_bf16_and_batched_measures_match_the_reference(monkeypatch):
    device = torch.device("cuda")
    # full fp32 convolutions, so that grouped and per-draw forwards differ by rounding only
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    data = load_digits().to(device)
    assert data.x_train.device.type == "cuda"
    assert torch.allclose(data.x_train.cpu(), load_digits().x_train, rtol=0, atol=1e-6)
    values = {"width": 16, "depth": 2, "dropout": 0.0, "batch_size": 32, "optimizer": "adam",
              "learning_rate": 3e-3, "weight_decay": 0.0}
    train = dict(TRAIN, max_steps=2000, lr_drop_steps=[1500])
    r = train_one(Config(values, {a: 0 for a in values}), data, train, 0, device)
    assert r.timing["precision"] == "bf16" and r.outcome["converged"]
    net = NiN(1, 10, 16, 2).to(device)
    net.load_state_dict(r.final_state)
    ctx = Context.from_models(net, data.x_train, data.y_train, 10,
                              settings=Settings(draws=256, stderr_ratio=0.5))
    z, examples = noise_draws(ctx, 1, 0, 64)
    one = perturbed_accuracies(ctx, 0.05 * z, examples, batched=False)
    grouped = perturbed_accuracies(ctx, 0.05 * z, examples, batched=True)
    # at most one of a draw's 128 examples on the other side of a near-tie
    assert max(abs(a - b) for a, b in zip(one, grouped, strict=True)) <= 1 / 128 + 1e-12
    a = sigma_search(ctx, False, batched=True)
    b = sigma_search(ctx, False, batched=False)
    assert a[0] == pytest.approx(b[0], rel=1e-2)
    # α, α' with restarts side by side (on a GPU by default) and one after another
    for magnitude in (False, True):
        runs = [alpha_search(Context.from_models(net, data.x_train, data.y_train, 10,
                                                 settings=Settings(restarts=2)),
                             magnitude, batched=way) for way in (None, False)]
        assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-2)
        assert runs[0][1]["converged"] and runs[1][1]["converged"]
