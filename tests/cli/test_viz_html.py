"""`cnnc viz -o model.html`: the interactive page, opened in a real headless browser.

The browser is Debian's `chromium` (or $CNNC_CHROMIUM) driven by the pip package `playwright`,
which is used only as a driver: no browser is downloaded, at install or test time. The page must
load without console errors, expand a collapsed inception block on a click (more layers shown),
find `conv1` from the search box and show a layer's details; a screenshot is taken each time
(kept in $CNNC_SCREENSHOT_DIR when that is set). Tests skip, saying why, where Graphviz, Chromium
or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, run_cli

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CNNC_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's `dot` is not installed (apt-get install graphviz)")


def write_page(tmp_path, name: str, *options: str) -> Path:
    out = tmp_path / f"{name}.html"
    r = run_cli("viz", str(EXAMPLES / f"{name}.cnn"), "-o", str(out), *options)
    assert r.code == 0, r.err
    return out


# ---- the page itself (no browser) ---------------------------------------------------------------

@needs_dot
def test_page_is_self_contained(tmp_path):
    text = write_page(tmp_path, "googlenet_2014", "--collapse").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched: no external scripts, style sheets, images or fonts
    assert not re.search(r"""<script[^>]+src=|<link[^>]+stylesheet|@import|url\(\s*['"]?https?:""", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<svg" in text and "cnncViz" in text
    data = json.loads(re.search(r'<script type="application/json" id="cnnc-data">(.*?)</script>', text,
                                re.S).group(1).replace("<\\/", "</"))
    assert data["initialDepth"] == 0
    assert len(data["nodes"]) == 142 and len(data["blocks"]) == 9
    conv1 = data["nodes"]["node-conv1"]
    assert conv1["shape"] == "64×112×112" and conv1["params"] == 9472 and conv1["macs"] == 118013952
    assert conv1["line"] == 21 and "conv 64 7x7 stride=2 pad=3" in conv1["src"]
    assert conv1["attrs"]["kernel"] == "7x7" and conv1["attrs"]["stride"] == "2x2"


# ---- in the browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's `dot` is not installed (apt-get install graphviz)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium to run the page in (apt-get install chromium, or set CNNC_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package `playwright` is not installed (pip install playwright; its browser "
                    "download is not needed, the system Chromium is used)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page with its console errors and uncaught exceptions collected."""

    def __init__(self, browser, path: Path, width=1400, height=1000):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(path.as_uri())
        self.page.wait_for_function("window.cnncViz !== undefined")

    def visible_layers(self) -> int:
        return self.page.locator("#canvas g.node:not(.hidden)").count()

    def screenshot(self, path: Path, name: str) -> Path:
        out = path / f"{name}.png"
        self.page.screenshot(path=str(out))
        keep = os.environ.get("CNNC_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(out, Path(keep) / out.name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return out


def test_googlenet_page_expand_search_details(browser, tmp_path):
    path = write_page(tmp_path, "googlenet_2014", "--collapse")
    page = Page(browser, path)
    p = page.page
    assert page.errors == []
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests

    # collapsed: the stem's layers and nine inception summaries
    before = page.visible_layers()
    assert before == 142 - 9 * 14
    assert p.locator("#canvas g.summary:not(.hidden)").count() == 9
    assert p.evaluate("cnncViz.visibleNodeCount()") == before
    page.screenshot(tmp_path, "viz_googlenet_collapsed")

    # a real click on the first inception's summary box expands it
    p.locator("#summary-inception1").click()
    after = page.visible_layers()
    assert after == before + 14
    assert p.locator("#summary-inception1").get_attribute("class").split().count("hidden") == 1
    assert p.locator("#cluster-inception1").is_visible()
    assert p.locator("#node-inception1\\.conv3").is_visible()
    assert "inception1" in p.locator("#details").inner_text()
    page.screenshot(tmp_path, "viz_googlenet_expanded")

    # clicking the expanded block's box collapses it again
    p.locator("#cluster-inception1 text.toggle").click()
    assert page.visible_layers() == before

    # hover shows a layer's attributes, shape, params, MACs and source line
    p.locator("#node-conv2").hover()
    details = p.locator("#details").inner_text()
    for fragment in ("conv2", "kernel", "1x1", "64×56×56", "4,160", "MACs", "googlenet_2014.cnn:22"):
        assert fragment in details, (fragment, details)

    # search: typing lists matches, Enter reveals the first (the top-level conv1)
    p.locator("#search").fill("conv1")
    results = p.locator("#results li").all_inner_texts()
    assert results and results[0].startswith("conv1")
    assert any(r.startswith("inception5.conv1") for r in results)
    p.locator("#search").press("Enter")
    conv1 = p.locator("#node-conv1")
    assert conv1.is_visible() and "focus" in conv1.get_attribute("class")
    details = p.locator("#details").inner_text()
    assert "conv1" in details and "9,472" in details and "118,013,952" in details
    assert "conv 64 7x7 stride=2 pad=3" in details

    # a match inside a collapsed block: revealing it expands its block
    p.locator("#search").fill("inception7.conv5")
    p.locator("#search").press("Enter")
    assert p.locator("#node-inception7\\.conv5").is_visible()
    assert page.visible_layers() == before + 14
    page.screenshot(tmp_path, "viz_googlenet_search")
    assert page.errors == []


def test_resnet_page_nested_blocks(browser, tmp_path):
    path = write_page(tmp_path, "resnet50", "--collapse")
    page = Page(browser, path)
    p = page.page
    stem = page.visible_layers()
    assert stem == 4 + 1 + 2  # image, conv, bn, relu, maxpool ... gap, dense
    p.locator("#summary-stage1").click()
    # stage1's bottlenecks show as summaries of their own; no layer of it yet
    assert page.visible_layers() == stem
    assert p.locator("#canvas g.summary:not(.hidden)").count() == 3 + 3
    p.locator("#summary-stage1\\.bottleneck_down1").click()
    assert page.visible_layers() == stem + 12
    # the shortcut edge of the expanded bottleneck is drawn, dashed red
    shortcut = p.locator("#canvas g.edge.shortcut:not(.hidden)").first
    assert shortcut.locator("path").get_attribute("stroke") == "#d62728"
    p.locator("#expand-all").click()
    assert page.visible_layers() == 175
    p.locator("#collapse-all").click()
    assert page.visible_layers() == stem
    page.screenshot(tmp_path, "viz_resnet50")
    assert page.errors == []


def test_densenet_page_loads_expanded_and_lr(browser, tmp_path):
    page = Page(browser, write_page(tmp_path, "densenet121", "--rankdir", "LR", "--depth", "1"))
    p = page.page
    before = page.visible_layers()
    p.locator("#expand-all").click()
    assert page.visible_layers() == 427 > before
    # the drawing is wider when everything is expanded (LR squeezes along x)
    assert float(p.locator("#canvas svg").get_attribute("width")) > 1000
    page.screenshot(tmp_path, "viz_densenet121_lr")
    assert page.errors == []
