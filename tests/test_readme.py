"""The README's quickstarts, run literally and in order in an empty folder, as a new
user would: only the demo's long training is cut to two models."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = "fgm-train grid --preset demo"
SHORT = DEMO + " --set width=24 --set depth=2,3 --set batch_size=128"


def quickstart_blocks() -> list[str]:
    """The bash blocks of the README's quickstart sections, comments dropped. The
    paper-grid block (CIFAR-10 from ~/data) is the one that needs a download."""
    text = README.read_text()
    blocks = []
    for section in re.split(r"^## ", text, flags=re.M):
        if not section.startswith("Quickstart"):
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
            if "--preset paper" in block:
                continue
            lines = [re.sub(r"\s+#\s.*$", "", line).rstrip() for line in block.splitlines()]
            blocks.append("\n".join(line for line in lines if line.strip()))
    return blocks


def test_the_quickstarts_run_in_order_in_an_empty_folder(tmp_path):
    blocks = quickstart_blocks()
    assert len(blocks) == 2 and DEMO in blocks[0] and "fgm-ingest results.csv" in blocks[1]
    script = "set -euo pipefail\n" + "\n".join(blocks).replace(DEMO, SHORT)
    env = {k: v for k, v in os.environ.items() if k != "FGM_DB"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '[{"n": 2187}]' in run.stdout                     # what the README promises
    assert (tmp_path / "report" / "index.html").is_file()
    assert (tmp_path / "fgm.duckdb").is_file() and (tmp_path / "results.duckdb").is_file()
    assert "Traceback" not in run.stderr and "FutureWarning" not in run.stderr
    python_quickstart(tmp_path, env)


# What the Python quickstart takes as given: a model of the user's, its training set
# and initial weights (here a small NiN, briefly trained on random images).
PRELUDE = """
import torch, torch.nn.functional as F
from fgm.train.nin import NiN
torch.manual_seed(0)
x_train, y_train = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
model = NiN(1, 10, 8, 1)
initial_weights = {k: v.clone() for k, v in model.state_dict().items()}
opt = torch.optim.Adam(model.parameters(), 1e-2)
for _ in range(20):
    opt.zero_grad(); F.cross_entropy(model(x_train), y_train).backward(); opt.step()
"""


def python_quickstart(folder: Path, env: dict) -> None:
    """The README's Python block, literally, in the folder the bash quickstarts left
    (results.duckdb): each expression's value printed, checked to be the answers."""
    section = next(s for s in re.split(r"^## ", README.read_text(), flags=re.M)
                   if s.startswith("Quickstart: from Python"))
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    lines = []
    for line in block.splitlines():   # a bare expression as a notebook shows it: printed
        code = re.sub(r"\s+#\s.*$", "", line)
        bare = code.strip() and "=" not in code.split("(")[0] and not code.strip().startswith(
            ("import", "with", "from"))
        indent = code[:len(code) - len(code.lstrip())]
        lines.append(f"{indent}print(repr(({code.strip()})))" if bare else code)
    run = subprocess.run([sys.executable, "-c", PRELUDE + "\n".join(lines)], cwd=folder,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "shape: (" in out and "measure_00" in out          # Table 5
    assert out.count("alt.") + out.count("Chart") >= 1        # the chart
    assert "'path_norm': " in out and "'frobenius_distance': " in out


def test_bring_your_own_models_runs_as_written_in_an_empty_folder(tmp_path):
    """The README's "Bring your own models" block, literally: a zoo written, ingested
    with its models.toml, every measure computed, the table printed."""
    section = next(s for s in re.split(r"^## ", README.read_text(), flags=re.M)
                   if s.startswith("Bring your own models"))
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert "--models my-zoo/models.toml" in block and "fgm-measure" in block
    env = {k: v for k, v in os.environ.items() if k != "FGM_DB"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "8 models (8 added" in out and "24 checkpoints of 8 models checked" in out
    # all 41 measures of each model: a value, or a failure or not_applicable with why
    assert re.search(r"8 models, \d+ values computed, \d+ failed", out), out
    header = next(line for line in out.splitlines() if line.startswith("kind"))
    assert "failed" in header and "not_applicable" in header
    rows = [line.split() for line in out.splitlines() if line.startswith("measure ")]
    assert len(rows) == 41
    path_norm = next(r for r in rows if r[1] == "path_norm")
    assert path_norm[2] == "4" and path_norm[-1] == "4"     # the VGGs' max-pooling
    assert (tmp_path / "zoo.duckdb").is_file() and "Traceback" not in run.stderr
