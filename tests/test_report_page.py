"""The report as a reader sees it: rendered by a real headless browser at 1280 px,
offline, every chart drawn, nothing wider than the window, and light text on the
dark cells of the heatmaps.

Needs Debian's chromium-headless-shell (.ci/run installs it); skipped without it."""

import html
import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query
from fgm.ingest.synthetic import synthetic_table

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine")

# Appended to a copy of the page (never to the page itself): after the charts are
# drawn, write the page's width and the number of drawn charts into the DOM.
PROBE = """<script>
setTimeout(() => {
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({scroll: document.documentElement.scrollWidth,
                                  inner: window.innerWidth,
                                  charts: document.querySelectorAll('section svg.marks').length});
  document.body.appendChild(p);
}, 3000);
</script></body>"""


def browse(page, *args):
    return subprocess.run([BROWSER, "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1280,4000", "--virtual-time-budget=15000", *args,
                           page.as_uri()], capture_output=True, text=True, timeout=300)


def test_the_report_renders_readably_at_1280_px(db, tmp_path):
    table = synthetic_table(n_measures=6).sample(300, seed=1)
    build_warehouse(db, table)
    out = tmp_path / "report"
    res = CliRunner().invoke(query, ["report", "--out", str(out), "--db", str(db),
                                     "--where", "depth >= 0"])
    assert res.exit_code == 0, res.output
    page = out / "index.html"
    text = page.read_text()
    assert "Models selected by <code>--where &#x27;depth &gt;= 0&#x27;</code>" in text
    words = text.split("<script>")[0]                   # the page, not the Vega bundle
    assert "|S| = 0" in words and ">s0<" not in words and "SPEC" not in words
    # a results table carries no final cross-entropy: the panel says so, not blank
    assert "No panel: none of these models has a final training cross-entropy" in words

    probed = tmp_path / "probed.html"
    head, _, tail = text.rpartition("</body>")        # the page's own end, not the bundle's
    probed.write_text(head + PROBE + tail)
    dom = browse(probed, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    probe = {k: int(v) for k, v in re.findall(r'"(\w+)":(\d+)', found.group(1).replace(
        "&quot;", '"'))}
    assert probe["charts"] >= 4                       # every chart drawn, offline
    assert probe["scroll"] <= probe["inner"]          # nothing runs off the page
    # light labels on dark heatmap cells, dark ones elsewhere
    fills = re.findall(r'<text[^>]*fill="(white|black)"', dom)
    assert "white" in fills and "black" in fills

    shot = tmp_path / "shot.png"
    browse(page, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(shot.read_bytes()[16:20], "big")
    assert width == 1280


def test_the_paper_section_renders_at_1280_px(db, tmp_path):
    """The paper-vs-here panels, drawn by the browser beside the rest, within the page."""
    table = synthetic_table(n_measures=3).sample(300, seed=1).rename(
        {"complexity.measure_00": "complexity.path_norm",
         "complexity.measure_01": "complexity.spectral_orig"})
    build_warehouse(db, table)
    out = tmp_path / "report"
    res = CliRunner().invoke(query, ["report", "--out", str(out), "--db", str(db)])
    assert res.exit_code == 0, res.output
    text = (out / "index.html").read_text()
    probed = tmp_path / "probed.html"
    head, _, tail = text.rpartition("</body>")
    probed.write_text(head + PROBE + tail)
    dom = browse(probed, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    probe = {k: int(v) for k, v in re.findall(r'"(\w+)":(\d+)', found.group(1).replace(
        "&quot;", '"'))}
    assert probe["scroll"] <= probe["inner"]
    section = dom.split("The paper and this warehouse")[1].split("</section>")[0]
    assert 'class="marks"' in section                  # its chart was drawn
    assert "Ψ in the paper" in section and "K in the paper" in section


# Appended like PROBE: the headers of the tables and the charts that run past their box
# (cut off, or seen only by scrolling sideways).
CLIP_PROBE = """<script>
setTimeout(() => {
  const clipped = [];
  for (const th of document.querySelectorAll('.scroll th')) {
    const box = th.closest('.scroll').getBoundingClientRect();
    if (th.getBoundingClientRect().right > Math.min(box.right, window.innerWidth) + 0.5)
      clipped.push(th.closest('section').querySelector('h2').textContent.split(':')[0]
                   + ' / ' + th.textContent);
  }
  for (const svg of document.querySelectorAll('section svg.marks')) {
    const section = svg.closest('section');
    if (svg.getBoundingClientRect().right > section.getBoundingClientRect().right + 0.5)
      clipped.push(section.querySelector('h2').textContent.split(':')[0] + ' (chart)');
  }
  const p = document.createElement('pre'); p.id = 'clipped';
  p.textContent = JSON.stringify(clipped);
  document.body.appendChild(p);
}, 3000);
</script></body>"""

# Measure names of the length fgm's own have, on the paper's seven axes.
LONG_NAMES = ["sum_of_spec_over_margin", "pac_sharpness_mag_orig", "path_norm_over_margin",
              "steps_0.1_to_0.01_loss", "prod_of_fro_over_margin", "pacbayes_mag_flatness"]


def test_every_column_header_is_within_the_page(db, tmp_path):
    """Tables 5 and 6 have a column per axis and their statistics' columns (Table 6's
    last one was cut off): each header is seen whole at 1280 px, none past the table's
    box or the window, and each chart fits its section."""
    table = synthetic_table(n_measures=6).sample(300, seed=1).rename(
        {f"complexity.measure_{i:02d}": f"complexity.{n}" for i, n in enumerate(LONG_NAMES)})
    build_warehouse(db, table)
    out = tmp_path / "report"
    res = CliRunner().invoke(query, ["report", "--out", str(out), "--db", str(db)])
    assert res.exit_code == 0, res.output
    text = (out / "index.html").read_text()
    # counts the same in every row are said once under the table, not given a column
    assert "In every row that has it: n_models = 300, draws = 10" in text
    probed = tmp_path / "probed.html"
    head, _, tail = text.rpartition("</body>")
    probed.write_text(head + CLIP_PROBE + tail)
    dom = browse(probed, "--dump-dom").stdout
    found = re.search(r'<pre id="clipped">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    assert json.loads(html.unescape(found.group(1))) == []
