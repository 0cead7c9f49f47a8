"""A tiny zoo of models fgm did not train, written as a user's own would be:

    python -m fgm.ingest.example_zoo my-zoo

writes into my-zoo/

    zoo.py          the architectures: a small ResNet (projection shortcut), a VGG
                    with and without BatchNorm, an MLP (plain PyTorch classes)
    models.toml     which class builds each architecture, and the dataset
    digits.npz      scikit-learn's 8x8 digits as uint8 images (x_train, y_train,
                    x_test, y_test): real data that ships with a package
    checkpoints/    each model's weights at initialisation (.safetensors), after
                    the first epoch (.pt) and at the end (.safetensors)
    traces/         each model's training loss, step by step (CSV)
    results.csv     one row per model: hp.arch, hp.width, seed, dataset,
                    train_acc, test_acc and the files above

Eight models (four architectures x two widths), each trained for a few
hundred steps on one CPU thread: about half a minute in all. Then:

    fgm-ingest my-zoo/results.csv --models my-zoo/models.toml
    fgm-measure --budget fast
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

ZOO_PY = '''"""Architectures of the example zoo: plain PyTorch, nothing of fgm."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A basic residual block; a 1x1 projection shortcut where the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, width=16, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    def __init__(self, width=16, batch_norm=False, num_classes=10, in_channels=1):
        super().__init__()
        layers, cin = [], in_channels
        for cout in (width, width, "M", 2 * width, 2 * width, "M"):
            if cout == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 2 * 2, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, width=16, num_classes=10, inputs=64):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 4 * width), nn.ReLU(),
                                 nn.Linear(4 * width, 4 * width), nn.ReLU(),
                                 nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.net(x)
'''

MODELS_TOML = '''# The example zoo's architectures and dataset (fgm-ingest --models; README: Bring
# your own models). "hp.width" takes each row's value of the width axis.

[arch.resnet]
source = "python:zoo.py:SmallResNet"
kwargs = {{ width = "hp.width", num_classes = 10 }}

[arch.vgg]
source = "python:zoo.py:VGG"
kwargs = {{ width = "hp.width", batch_norm = false }}

[arch.vgg_bn]
source = "python:zoo.py:VGG"
kwargs = {{ width = "hp.width", batch_norm = true }}

[arch.mlp]
source = "python:zoo.py:MLP"
kwargs = {{ width = "hp.width" }}

[dataset.digits8]
source = "npz:digits.npz"     # uint8 images, scaled to [0, 1], then normalised
mean = [{mean:.6f}]
std = [{std:.6f}]
'''

ARCHS = {"resnet": ("SmallResNet", {}), "vgg": ("VGG", {"batch_norm": False}),
         "vgg_bn": ("VGG", {"batch_norm": True}), "mlp": ("MLP", {})}
WIDTHS = (8, 16)


def _digits():
    import numpy as np
    from sklearn.datasets import load_digits
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]   # NHWC
    test, train = order[:497], order[497:]
    return images[train], bunch.target[train], images[test], bunch.target[test]


def make_zoo(out: Path, steps: int = 300, seed: int = 0, log=print) -> Path:
    """Write the zoo into `out` (made if missing; its files are overwritten)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.py").write_text(ZOO_PY)
    x_tr, y_tr, x_te, y_te = _digits()
    np.savez(out / "digits.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    scaled = x_tr.astype(np.float32) / 255
    mean, std = float(scaled.mean()), float(scaled.std())
    (out / "models.toml").write_text(MODELS_TOML.format(mean=mean, std=std))
    # the inputs exactly as models.toml's preprocessing gives them to fgm
    mean32, std32 = np.float32(round(mean, 6)), np.float32(round(std, 6))
    def inputs(x):
        return torch.from_numpy(((x.astype(np.float32) / 255 - mean32) / std32)
                                .transpose(0, 3, 1, 2).copy())
    xs, xt = inputs(x_tr), inputs(x_te)
    ys, yt = torch.as_tensor(y_tr), torch.as_tensor(y_te)
    namespace: dict = {}
    exec(compile(ZOO_PY, str(out / "zoo.py"), "exec"), namespace)
    for sub in ("checkpoints", "traces"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir()
    rows, batch = [], 64
    torch.set_num_threads(1)
    for arch, (cls, kwargs) in ARCHS.items():
        for width in WIDTHS:
            start = time.perf_counter()
            name = f"{arch}-w{width}-s{seed}"
            torch.manual_seed(seed)
            model = namespace[cls](width=width, **kwargs)
            save_file(model.state_dict(), out / "checkpoints" / f"{name}-init.safetensors")
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(seed)
            order, trace, per_epoch = torch.randperm(len(xs), generator=gen), [], len(xs) // batch
            for step in range(1, steps + 1):
                k = (step - 1) % per_epoch
                if k == 0 and step > 1:
                    order = torch.randperm(len(xs), generator=gen)
                idx = order[k * batch:(k + 1) * batch]
                loss = F.cross_entropy(model.train()(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                trace.append((step, step / per_epoch, float(loss.detach())))
                if step == per_epoch:    # a plain state dict, as torch.save writes it
                    torch.save(model.state_dict(), out / "checkpoints" / f"{name}-epoch1.pt")
            model.eval()
            save_file(model.state_dict(), out / "checkpoints" / f"{name}-final.safetensors")
            with torch.no_grad():
                train_acc = float((model(xs).argmax(1) == ys).double().mean())
                test_acc = float((model(xt).argmax(1) == yt).double().mean())
            with open(out / "traces" / f"{name}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "epoch", "train_loss"])
                w.writerows(trace)
            rows.append({"hp.arch": arch, "hp.width": width, "seed": seed,
                         "dataset": "digits8", "train_acc": round(train_acc, 6),
                         "test_acc": round(test_acc, 6),
                         "checkpoint.init": f"checkpoints/{name}-init.safetensors",
                         "checkpoint.epoch1": f"checkpoints/{name}-epoch1.pt",
                         "checkpoint.final": f"checkpoints/{name}-final.safetensors",
                         "trace": f"traces/{name}.csv"})
            log(f"  {name}: train acc {train_acc:.3f}, test acc {test_acc:.3f} "
                f"({time.perf_counter() - start:.1f} s)")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write the zoo into")
    ap.add_argument("--steps", type=int, default=300, help="training steps per model")
    args = ap.parse_args()
    print(f"writing a zoo of {len(ARCHS) * len(WIDTHS)} models into {args.out}/")
    make_zoo(args.out, args.steps)
    print(f"done: {args.out}/results.csv, {args.out}/models.toml\n"
          f"next: fgm-ingest {args.out}/results.csv --models {args.out}/models.toml")


if __name__ == "__main__":
    main()
