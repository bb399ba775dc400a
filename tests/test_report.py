"""`dhr eval --report DIR`: the static HTML page, its overlays and bar chart, rendered in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from dhr_cli.pipeline.evaluate import run_eval
from dhr_cli.pipeline.report import bar_chart_svg, write_report
from tests.test_eval_cli import gt_masks, invoke, make_dataset, noisy, write_store

CLASSES = ["background", "cat", "dog & co"]  # a name that needs escaping


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tables: list[str] = []
        self.rects = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "table":
            self.tables.append(a.get("id", ""))
        if tag == "rect" and a.get("class") == "bar":
            self.rects += 1


@pytest.fixture
def two_methods(tmp_path):
    gts = gt_masks(n=6, h=30, w=40)
    root = make_dataset(tmp_path / "data", gts, classes=CLASSES)
    good = write_store(tmp_path / "good.h5", noisy(gts, seed=1, p=0.1), classes=CLASSES)
    bad = write_store(tmp_path / "bad.h5", noisy(gts, seed=2, p=0.6), classes=CLASSES)
    return tmp_path, root, good, bad


def test_report_page_tables_chart_and_overlays(two_methods):
    tmp, root, good, bad = two_methods
    result = run_eval([good, bad], root)
    page = write_report(result, tmp / "rep", n_images=2)
    text = page.read_text()
    parser = _Collect()
    parser.feed(text)
    assert parser.tables == ["summary", "per-class"]
    assert "dog &amp; co" in text and "dog & co<" not in text
    assert f"{100 * result.methods[0].miou:.1f}" in text and f"{100 * result.methods[1].miou:.1f}" in text
    # 3 classes x 2 methods bars, all classes present
    assert parser.rects == 6
    # worst 2 of good + up to 2 most improved; each row: image, GT, good, bad
    assert len(parser.imgs) >= 8 and len(parser.imgs) % 4 == 0
    for src in parser.imgs:
        with Image.open(page.parent / src) as im:
            assert im.format == "PNG" and im.size[0] >= 40
    worst = np.nanargmin(result.methods[0].per_image_miou())
    assert f"{result.methods[0].ids[worst]}: image mIoU" in text
    assert "improves most over bad" in text
    assert not list((tmp / "rep").rglob("*.tmp"))


def test_bar_heights_follow_iou():
    svg = bar_chart_svg(["a", "b"], [np.array([1.0, 0.25]), np.array([0.5, np.nan])], ["m1", "m2"])
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([0-9.]+)"', svg)]
    assert heights == [200.0, 100.0, 50.0]  # NaN draws no bar


def test_report_refuses_non_empty_folder_before_scoring(two_methods):
    tmp, root, good, bad = two_methods
    (tmp / "rep").mkdir()
    (tmp / "rep" / "x").write_text("x")
    r = invoke("eval", "--pred", good, "--data", root, "--report", tmp / "rep", "-q")
    assert r.exit_code == 1 and "not empty" in r.output
    r = invoke("eval", "--pred", good, "--data", root, "--report", tmp / "rep", "-q", "--overwrite")
    assert r.exit_code == 0 and (tmp / "rep" / "index.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium); the page is not rendered")
def test_report_renders_in_headless_chromium(two_methods):
    tmp, root, good, bad = two_methods
    r = invoke("eval", "--pred", good, "--compare", bad, "--data", root, "--report", tmp / "rep", "-q", "--top", 2)
    assert r.exit_code == 0, r.output
    shot = tmp / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--hide-scrollbars", "--force-device-scale-factor=1", f"--screenshot={shot}", "--window-size=1200,2400",
             (tmp / "rep" / "index.html").as_uri()],
            capture_output=True, timeout=90, check=False,
        )  # fmt: skip
    assert shot.exists(), "chromium wrote no screenshot"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def share(rgb, tol=6):
        return float((np.abs(px - np.array(rgb)).max(axis=2) <= tol).mean())

    assert share((255, 255, 255)) < 0.97  # not a blank page
    assert share((0x1F, 0x77, 0xB4)) > 1e-4 and share((0xFF, 0x7F, 0x0E)) > 1e-4  # both methods' bars drawn
    # overlays decoded and shown: grey image (90) blended with the cat colour (128, 0, 0) at alpha .55
    assert share((111, 40, 40), tol=3) > 1e-4
