"""Tasks for tests/test_pool.py: module-level, so that a spawned worker imports them."""

import os
import signal

from fgm.train.pool import report


def square(x: int) -> int:
    report("square", x)
    return x * x


def boom() -> None:
    raise ValueError("boom")


def whoami() -> tuple[int, int]:
    import torch
    return os.getpid(), torch.get_num_threads()


def die_once(marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def die_always() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
