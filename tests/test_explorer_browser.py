"""Notebook 09's explorer, clicked in a real browser.

nbmake only sees a static picture of the explorer. This test does what a person does:
it starts `jupyter lab --no-browser` on 127.0.0.1 with a token, opens notebook 09 in
headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium), runs
all cells, then moves the layer slider, picks a head and a level, clicks the image in
encoder mode, switches to the decoder and clicks a detection. After each step it checks
that the figure on the page really changed, and, from the kernel, that the explorer's
state is what was asked for: the clicked pixel, the encoder token under it, the
detection whose box was clicked. Screenshots are saved under out/browser/.

The notebook runs as a copy in a temporary folder with two cells added: `%matplotlib
widget` first (the notebook's own instruction for clicking: ipympl draws the figure as a
live canvas) and, last, a probe that prints the explorer's state as JSON. The test
re-runs the probe after each interaction. Skipped, with the reason, where Chromium,
its driver or selenium is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "09_sampling_point_explorer.ipynb"
ARTIFACTS = REPO / "out" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TOKEN = "ddetr-browser-test"
MISSING = ("Chromium is absent (apt-get install chromium chromium-driver): the browser test "
           "of notebook 09's explorer is skipped")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=MISSING)

PROBE = """\
import json as _json
from ddetr_tutorial import visualize as _V
_probe = globals().get("_probe", 0) + 1
_s, _d = explorer.state, explorer.data
_h, _w = _d["image_size"]
_det = _d["detections"]
_keep = _det["query"][_det["score"] >= explorer.score_threshold]
_boxes = _V.boxes_to_pixels(_d["decoder"][_s["layer"]]["boxes"][_keep], _d["image_size"])
_level = _V.token_level(_d, _s["query"]) if _s["kind"] == "encoder" else None
print("STATE", _probe, _json.dumps({
    "state": _s,
    "image_size": [_h, _w],
    "corners": explorer._fig.axes[0].transData.transform([[0, 0], [_w, _h]]).tolist(),
    "figure_px": [explorer._fig.bbox.width, explorer._fig.bbox.height],
    "candidates": [[int(q), *map(float, b)] for q, b in zip(_keep, _boxes)],
    "reference": _V.query_points(_d, _s["kind"], _s["layer"], _s["query"])["reference"].tolist(),
    "stride": None if _level is None else _w / int(_d["spatial_shapes"][_level][1]),
}, default=float))
"""


def _cell(kind: str, source: str) -> dict:
    cell = {"cell_type": kind, "id": f"browser-{kind}-{len(source)}", "metadata": {},
            "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 over a copy of notebook 09 (with the two extra
    cells); yields (base url, notebook file name, index of the explorer's cell)."""
    pytest.importorskip("selenium", reason="selenium is absent: pip install selenium")
    root = tmp_path_factory.mktemp("lab")
    nb = json.loads(NOTEBOOK.read_text())
    nb["cells"] = [_cell("code", "%matplotlib widget")] + nb["cells"] + [_cell("code", PROBE)]
    explorer_cell = next(i for i, c in enumerate(nb["cells"])
                         if "explorer = your_explorer()" in "".join(c["source"]))
    (root / "nb09.ipynb").write_text(json.dumps(nb))
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "official Jupyter news?" toast over the page
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = _free_port()
    env = {**os.environ, "DDETR_FAST": "1", "JUPYTER_CONFIG_DIR": str(root / "config"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
           "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    env.pop("DDETR_CHECKPOINT", None)  # the shipped model, whatever the caller's shell says
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
         "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("jupyter lab did not start: "
                                + (root / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield base, "nb09.ipynb", explorer_cell
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The notebook as the browser shows it, and the probe cell that reads the kernel."""

    def __init__(self, driver, explorer_cell: int):
        self.driver, self.explorer_cell, self.probes = driver, explorer_cell, 0

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, what, condition, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()  # None, False, "" or [] mean "not yet"
            if value is not None and (not isinstance(value, (bool, str, list)) or value):
                return value
            if time.monotonic() > deadline:
                errors = self.js("return Array.from(document.querySelectorAll("
                                 "'[data-mime-type=\"application/vnd.jupyter.stderr\"], "
                                 ".jp-RenderedText[data-mime-type*=\"error\"]'))"
                                 ".map(e => e.innerText).join('\\n---\\n')")
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; "
                            f"error outputs on the page: {errors[-3000:] or 'none'}")
            time.sleep(0.25)

    def probe(self) -> dict:
        """Re-run the last cell and parse the explorer state it prints."""
        self.probes += 1
        tag = f"STATE {self.probes} "
        self.js("const p = window.jupyterapp.shell.currentWidget;"
                "p.content.activeCellIndex = p.content.widgets.length - 1;"
                "window.jupyterapp.commands.execute('notebook:run-cell');")
        text = self.wait(f"probe {self.probes}",
                         lambda: t if tag in (t := self.last_output()) else "")
        return json.loads(text.split(tag, 1)[1].strip().splitlines()[0])

    def last_output(self) -> str:
        return self.js("const c = document.querySelectorAll('.jp-Notebook .jp-Cell');"
                       "const o = c[c.length - 1].querySelector('.jp-OutputArea');"
                       "return o ? o.innerText : '';")

    def explorer(self):
        cells = self.driver.find_elements("css selector", ".jp-Notebook .jp-Cell")
        return cells[self.explorer_cell]

    def canvases(self):
        # ipympl stacks two canvases: the figure, and on top the one that takes the mouse
        return self.explorer().find_elements("css selector",
                                             ".jupyter-matplotlib-canvas-div canvas")

    def canvas(self):
        return self.canvases()[-1]

    def figure_pixels(self) -> np.ndarray:
        from io import BytesIO

        from PIL import Image

        shot = self.canvases()[0]
        return np.asarray(Image.open(BytesIO(shot.screenshot_as_png)).convert("RGB")).astype(int)

    def control(self, label: str):
        for box in self.explorer().find_elements("css selector", ".widget-inline-hbox"):
            labels = box.find_elements("css selector", ".widget-label")
            if labels and labels[0].text.strip() == label:
                return box
        raise AssertionError(f"no control labelled {label!r} in the explorer")

    def changed_from(self, before: np.ndarray, what: str) -> np.ndarray:
        """Wait until the figure differs from `before` (ipympl redraws asynchronously)."""
        def differs():
            now = self.figure_pixels()
            return now if now.shape != before.shape or np.abs(now - before).sum() > 0 else None
        return self.wait(f"the figure to change after {what}", differs, timeout=30)

    def click_image(self, report: dict, x: float, y: float):
        """Click image pixel (x, y), mapped through axes 0's data-to-display transform."""
        from selenium.webdriver.common.action_chains import ActionChains

        (dx0, dy0), (dx1, dy1) = report["corners"]  # display px of image (0, 0) and (w, h)
        h, w = report["image_size"]
        fig_w, fig_h = report["figure_px"]
        canvas = self.canvas()
        rect = self.js("const r = arguments[0].getBoundingClientRect();"
                       "return [r.width, r.height];", canvas)
        sx, sy = rect[0] / fig_w, rect[1] / fig_h  # CSS px per figure px
        disp_x, disp_y = dx0 + (dx1 - dx0) * x / w, dy0 + (dy1 - dy0) * y / h
        css_x, css_y = disp_x * sx, (fig_h - disp_y) * sy  # display y grows upwards
        ActionChains(self.driver).move_to_element_with_offset(
            canvas, round(css_x - rect[0] / 2), round(css_y - rect[1] / 2)).click().perform()
        return (w / abs(dx1 - dx0)) / sx  # image px per CSS px: the click's resolution


def _save(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.js("arguments[0].scrollIntoView({block: 'start'});", page.explorer())
    time.sleep(0.5)
    page.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_the_explorer_responds_to_its_controls_and_to_clicks(lab, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    base, name, explorer_cell = lab
    page = Page(browser, explorer_cell)
    browser.get(f"{base}/lab/tree/{name}?token={TOKEN}")
    page.wait("the notebook and its kernel", lambda: page.js(
        "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
        "return !!(w && w.context && w.context.isReady && w.sessionContext &&"
        " w.sessionContext.session && w.sessionContext.session.kernel &&"
        " w.content.widgets.length > 0);"), timeout=120)
    page.js("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    page.wait("all cells to run (the probe's output)", lambda: "STATE 1 " in page.last_output(),
              timeout=400)
    page.probes = 1
    page.wait("the explorer's live canvas", page.canvases)
    page.js("arguments[0].scrollIntoView({block: 'center'});", page.explorer())
    time.sleep(1.0)
    report = page.probe()
    state = report["state"]
    assert state["kind"] == "encoder", state  # the notebook opens the explorer on an encoder pixel
    figure = page.figure_pixels()
    _save(page, "explorer_0_opened")

    # The layer slider, moved with the keyboard as a person would after clicking its handle.
    slider = page.control("layer")
    handle = slider.find_element("css selector", ".noUi-handle, .slider-handle")
    handle.click()
    target_layer = 0 if state["layer"] > 0 else 1
    handle.send_keys(Keys.ARROW_LEFT if target_layer < state["layer"] else Keys.ARROW_RIGHT)
    figure = page.changed_from(figure, "moving the layer slider")
    report = page.probe()
    assert report["state"]["layer"] == target_layer, report["state"]

    # One head, then one level, from their dropdowns.
    Select(page.control("head").find_element("css selector", "select")).select_by_visible_text("1")
    figure = page.changed_from(figure, "picking head 1")
    report = page.probe()
    assert report["state"]["head"] == 1, report["state"]
    Select(page.control("level").find_element("css selector", "select")).select_by_visible_text("2")
    figure = page.changed_from(figure, "picking level 2")
    report = page.probe()
    assert report["state"]["level"] == 2 and report["state"]["head"] == 1, report["state"]
    _save(page, "explorer_1_layer_head_level")

    # A click on the image picks the encoder query at that pixel.
    h, w = report["image_size"]
    old = report["state"]["pixel"]
    x, y = (0.25 * w, 0.7 * h) if old is None or old[0] > w / 2 else (0.75 * w, 0.3 * h)
    resolution = page.click_image(report, x, y)
    figure = page.changed_from(figure, "clicking the image in encoder mode")
    report = page.probe()
    state = report["state"]
    assert state["kind"] == "encoder", state
    tolerance = resolution + 0.5  # image px: a click lands on a whole CSS pixel
    assert abs(state["pixel"][0] - x) <= tolerance and abs(state["pixel"][1] - y) <= tolerance, \
        (state["pixel"], (x, y), resolution)
    # ... and the query is the token whose cell holds the clicked pixel, on its level
    rx, ry = report["reference"]
    half = report["stride"] / 2 + tolerance
    assert abs(rx - x) <= half and abs(ry - y) <= half, (report["reference"], (x, y),
                                                         report["stride"])
    _save(page, "explorer_2_encoder_click")

    # The decoder, then a click inside one detection's box (and no other's) picks it.
    decoder = [b for b in page.explorer().find_elements("css selector", ".widget-toggle-button")
               if b.text.strip() == "decoder"]
    assert decoder, "no 'decoder' toggle button"
    decoder[0].click()
    figure = page.changed_from(figure, "switching to the decoder")
    report = page.probe()
    assert report["state"]["kind"] == "decoder", report["state"]
    boxes = report["candidates"]
    assert boxes, "the shipped model has no confident detection on the explorer's image"
    pick = None
    for q, x0, y0, x1, y1 in boxes:
        if q == report["state"]["query"] and len(boxes) > 1:
            continue  # pick another detection than the selected one, so the figure must change
        for fx, fy in ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3)):
            px, py = x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)
            others = [b for b in boxes if b[0] != q and b[1] <= px <= b[3] and b[2] <= py <= b[4]]
            if not others:
                pick = (q, px, py)
                break
        if pick:
            break
    assert pick, f"no point lies in exactly one detection box: {boxes}"
    q, px, py = pick
    page.click_image(report, px, py)
    if q != report["state"]["query"]:
        figure = page.changed_from(figure, f"clicking detection q{q}")
    report = page.probe()
    assert report["state"]["kind"] == "decoder" and report["state"]["query"] == q, \
        (report["state"], pick)
    _save(page, "explorer_3_decoder_click")
    (ARTIFACTS / "explorer_figure.png").write_bytes(page.canvas().screenshot_as_png)
