"""report.html in a real browser: a small study on the tiny model (cells run in this process, as in
tests/unit/test_study.py's tiny-model test), its report opened from a file:// URL by headless Chromium with the
network shut off. No console errors, every figure drawn with all its data points, a screenshot that is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from budgetlm.report import figures as fg
from budgetlm.report import latent as report_latent
from budgetlm.report.build import build_report, load_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # fmt: skip  # any network request fails (and logs an error)

PIPELINES = """
  int4: [{method: rtn, bits: 4}]
  sparse25: [{method: magnitude, sparsity: 0.25}]
  sparse50: [{method: magnitude, sparsity: 0.5}]
  sparse25-int8: [{method: magnitude, sparsity: 0.25}, {method: rtn, bits: 8}]
  sparse50-int8: [{method: magnitude, sparsity: 0.5}, {method: rtn, bits: 8}]
"""


@pytest.fixture
def tiny_study(tmp_path, tiny_study_data):
    """Six cells on tiny-random (baseline, rtn, magnitude pruning with and without a following int8 step: a
    pairing for the slope chart) on a local ARC-Easy file, text perplexity and text-cloze, with a tiny benchmark and
    the latent-space rows; the cells run in this process."""
    from budgetlm.experiments.cell import run_cell
    from budgetlm.experiments.study import run_study

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: tiny-html\nmodels: [tiny-random]\npipelines:{PIPELINES}tasks: [arc_easy, text-ppl, text-cloze]\n"
        f"limit: 6\ndata_dir: {tiny_study_data}\nbench: {{prefill: [16], decode_tokens: 4, repeats: 1, warmup: 0}}\n"
        "latent: {tasks: [arc_easy, text-cloze], items: 8, perplexity: 4}\n"
    )
    out = run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, on_status: run_cell(folder))
    return out, build_report(out)


def _cells(study: Path) -> tuple[list[dict], list[str]]:
    """The report's done cells as the figure functions take them, and the tasks."""
    _, cells, _, tasks = load_study(study)
    return [c for c in cells if c["status"] == "done"], tasks


def chromium(*args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _figure_divs(dom: str) -> dict[str, str]:
    """{div id: its rendered markup} for every plotly figure of the dumped page."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="([\w-]+)" class="plotly-graph-div', dom)]
    return {
        fid: dom[pos : (starts[k + 1][0] if k + 1 < len(starts) else len(dom))] for k, (pos, fid) in enumerate(starts)
    }


def rendered_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran; fails on any message the page wrote to the console (a working page
    writes none: an uncaught exception or a console.error would show here)."""
    run = chromium(
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom", url, profile=profile
    )
    assert run.returncode == 0, run.stderr[-2000:]
    console = [ln for ln in run.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert not console, "\n".join(console)
    return run.stdout


def test_the_console_check_sees_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>notDefinedAnywhere();</script></body></html>")
    with pytest.raises(AssertionError, match="Uncaught ReferenceError: notDefinedAnywhere"):
        rendered_dom(page.as_uri(), tmp_path / "p")


def test_report_html_renders_in_headless_chromium(tiny_study, tmp_path):
    out, paths = tiny_study
    page = paths["html"]
    text = page.read_text()
    assert not re.search(r"""<(script|link|img|iframe)[^>]*(src|href)=["']?https?:""", text)  # plotly.js inlined
    url = page.resolve().as_uri()

    # 1. the DOM after the page's scripts ran, and the browser's console on stderr
    dom = rendered_dom(url, tmp_path / "p1")
    divs = _figure_divs(dom)

    cells, tasks = _cells(out)
    assert len(cells) == 6
    pareto = fg.pareto_figures(cells, tasks)
    recovery = fg.recovery_heatmap(cells, tasks)
    slopes, note = fg.slope_figures(cells, tasks)
    assert note == "" and [s.conditions for s in slopes] == [("before rtn", "after rtn")]  # sparse25/50, then int8
    expected = {f.id: sum(len(p.marks) for p in f.panels) for f in pareto}
    expected.update({s.id: 2 * sum(len(p.pairs) for p in s.panels) for s in slopes})
    latent = report_latent.latent_figure(cells)
    expected[latent.id] = sum(len(p.ids) for p in latent.panels)
    assert expected[latent.id] == 6 * 16  # every cell's t-SNE panel with its 8 + 8 items
    assert set(divs) == set(expected) | {recovery.id, "devices"}
    for fid, n in expected.items():
        assert n > 0, fid
        assert len(re.findall(r'class="point[ "]', divs[fid])) == n, fid  # one drawn marker per plotted store row
        assert "NaN" not in divs[fid], fid
    assert expected["pareto-0"] == 4 * 6  # every cell on each of the four cost axes
    # heatmaps are drawn as one image, with each cell's value written over it
    for fid, labels in ((recovery.id, recovery.text), ("devices", None)):
        drawn = re.findall(r'class="heatmap-label"><text[^>]*data-unformatted="([^"]*)"', divs[fid])
        assert "<image" in divs[fid], fid
        if labels is not None:
            assert drawn == [t for row in labels for t in row], fid
        else:
            assert len(drawn) == 6 * 8 and all(float(v) > 0 for v in drawn), drawn  # six cells x eight devices

    # 2. a screenshot that is not blank
    shot = tmp_path / "shot.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--virtual-time-budget=15000", url,
                   profile=tmp_path / "p2")  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] >= 2000 and pixels.var() > 100  # text and plots, not a blank page
    colours = {tuple(p) for p in pixels[::7, ::7].reshape(-1, 3).astype(int)}
    assert len(colours) > 50  # markers, heatmap colours and text, not a one-colour page
