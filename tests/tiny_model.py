"""A seeded tiny NiN (width 16, 2 blocks) trained to the stop on the first digits:
the model the search and batching tests measure (trained once per test module)."""

import torch

from fgm.measures.context import Context, Settings
from fgm.train.data import Data, load_digits
from fgm.train.grid import Config
from fgm.train.loop import train_one
from fgm.train.nin import NiN

TRAIN = {"stop_cross_entropy": 0.01, "max_steps": 2000, "lr_drop_steps": [1500],
         "lr_drop_factor": 0.1, "estimate_batches": 10, "trace_every": 50}
VALUES = {"width": 16, "depth": 2, "dropout": 0.0, "batch_size": 32, "optimizer": "adam",
          "learning_rate": 3e-3, "weight_decay": 0.0}


def train_tiny(examples: int) -> tuple[NiN, torch.Tensor, torch.Tensor]:
    """(net, x, y) of the model trained on the first `examples` training digits."""
    d = load_digits()
    data = Data("digits", d.x_train[:examples], d.y_train[:examples], d.x_test[:100],
                d.y_test[:100], 10, d.info)
    r = train_one(Config(VALUES, {a: 0 for a in VALUES}), data, TRAIN, 0, torch.device("cpu"))
    assert r.outcome["converged"]
    net = NiN(1, 10, 16, 2)
    net.load_state_dict(r.final_state)
    return net, data.x_train, data.y_train


def make_ctx(model, **settings) -> Context:
    net, x, y = model
    return Context.from_models(net, x, y, 10, settings=Settings(**settings))
