"""examples/quickstart.ipynb, executed top to bottom in a fresh kernel as a user
would run it, with a check on what its cells show."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parent.parent / "examples" / "quickstart.ipynb"


def text(output: dict) -> str:
    if output["output_type"] == "stream":
        return output["text"]
    data = output.get("data", {})
    return data.get("text/plain", "") + data.get("text/html", "")


def test_quickstart_notebook_runs_and_shows_its_answers(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [[o for o in cell.get("outputs", [])] for cell in nb.cells
               if cell.cell_type == "code"]
    assert not [o for cell in outputs for o in cell if o["output_type"] == "error"]
    shown = ["\n".join(text(o) for o in cell) for cell in outputs]
    assert shown[0].startswith("fgm ")
    assert "model_id" in shown[1] and "depth" in shown[1]
    assert "path_norm" in shown[2] and "oracle" in shown[2] and "Psi" in shown[2]
    assert "tau = " in shown[3] and "'depth':" in shown[3]
    assert "cmi[depth]" in shown[4] and "min |S|=2" in shown[4]
    svg = [o["data"]["image/svg+xml"] for o in outputs[5] if "image/svg+xml" in o.get("data", {})]
    assert svg and "<svg" in svg[0] and "Kendall" in svg[0], outputs[5]
    assert "mean_gap" in shown[6]
    values = shown[7]
    for name in ("path_norm", "sum_of_fro", "frobenius_distance", "pacbayes_flatness"):
        assert f"'{name}': " in values and f"'{name}': None" not in values
    assert "'steps_to_0.1_loss': None" in values
    assert "trace" in shown[8]
