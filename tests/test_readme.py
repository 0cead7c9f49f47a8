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
