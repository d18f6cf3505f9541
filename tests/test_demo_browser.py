"""The demo app (app.py) in a real browser: the app is served from a subprocess with a tiny saved detector, headless
Chromium (the system's `chromium`, driven by Playwright; no browser is ever downloaded) uploads images and moves the
threshold slider as a person would, and the page must show what `modeling_dit_detection.predict.detect` gives.

Needs the `demo` extra (gradio) and playwright (the `test` extra): without them this module is skipped, saying so,
unless REQUIRE_BROWSER_TEST=1 (set by .ci/run), where their absence fails; the same for a missing Chromium, with the
command that installs it.
"""

import importlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import PIL.Image
import pytest
import torch
from helpers import ROOT, load_app, tiny_config, worker_env

from modeling_dit_detection import DiTDetectionImageProcessor, DiTForObjectDetection
from modeling_dit_detection.predict import detect, load_model, read_image
from modeling_dit_detection.training.synthetic_data import render_synthetic_example


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("REQUIRE_BROWSER_TEST") == "1":
            raise
        pytest.skip(f"{name} is not installed; pip install '.[test,demo]' (and apt-get install chromium) to run the "
                    "browser test", allow_module_level=True)


pytestmark = pytest.mark.slow  # a server and a browser: ~20 s

_optional("gradio")
sync_api = _optional("playwright.sync_api")

CLASSES = ["circle", "square", "triangle", "cross", "ring"]
TIMEOUT_S = 60  # for the server to come up and for the page to show a result; seconds on an idle machine


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny detector (model + processor). Its class heads are scaled up so that its scores spread over
    (0, 1) rather than sitting at the focal-loss prior (~0.01): a threshold on the slider's 0.01 grid then keeps a
    few of its detections."""
    torch.manual_seed(0)
    config = tiny_config(id2label=dict(enumerate(CLASSES)))
    model = DiTForObjectDetection(config)
    with torch.no_grad():
        for head in model.class_heads:
            head.weight.mul_(30)
            head.bias.zero_()
    folder = tmp_path_factory.mktemp("detector")
    model.save_pretrained(folder)
    DiTDetectionImageProcessor(size=dict(zip(("height", "width"), config.image_size)),
                               size_divisor=config.backbone_stride).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(folder, tmp_path_factory):
    """The URL of `python app.py --model folder`, served on a free localhost port until the module's tests end."""
    scratch = tmp_path_factory.mktemp("app")
    url = f"http://127.0.0.1:{_free_port()}"
    env = worker_env(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(scratch / "gradio"))
    with open(scratch / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(folder), "--host",
                                   "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
                                  cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_served(url, server, scratch / "server.log")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_served(url: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with status {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve {url} within {TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = ("No chromium on PATH: the browser test uses the system's Chromium (apt-get install chromium); "
                   "Playwright's own browser download is never used.")
        if os.environ.get("REQUIRE_BROWSER_TEST") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh page of the app, once the model is loaded (the status line says "ready")."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_S * 1000)
    page.goto(app_url)
    page.get_by_text("ready (loaded in").wait_for()
    yield page
    page.close()


# ----------------------------------------------------------------------------------------------- reading the page


def _shown_rows(page) -> list[list[str]]:
    """The detections table as the page renders it: one list of cell texts per row."""
    return page.locator("#detections [role=row][data-index]").evaluate_all(
        "rows => rows.map(row => Array.from(row.querySelectorAll('[role=gridcell]')).map(cell => cell.innerText))")


def _shown_row_count(page) -> int:
    return int(page.locator("#detections [role=grid]").get_attribute("aria-rowcount")) - 1  # less the header


def _pixels(image: PIL.Image.Image) -> tuple[tuple[int, int], bytes]:
    return image.size, image.convert("RGB").tobytes()


def _shown_pixels(page) -> tuple[tuple[int, int], bytes]:
    """The size and pixels of the drawn result, fetched from the URL the page shows it from."""
    source = page.locator("#drawn img").get_attribute("src")
    return _pixels(PIL.Image.open(io.BytesIO(page.request.get(source).body())))


def _wait_for(page, read, expected):
    """`read(page)` once it equals `expected`, else its last value after TIMEOUT_S (for the assertion to show)."""
    deadline = time.monotonic() + TIMEOUT_S
    while (value := read(page)) != expected and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    return value


def _as_shown(result: dict) -> list[list[str]]:
    """detect's `result` as the table must show it: best score first; label, score to 3 decimals, box x0, y0, x1,
    y1 to 1 decimal (trailing zeros dropped, as the page writes numbers)."""
    def number(value: float, decimals: int) -> str:
        return f"{round(value, decimals):.{decimals}f}".rstrip("0").rstrip(".")

    rows = sorted(zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()),
                  key=lambda row: -row[0])
    return [[CLASSES[label], number(score, 3), *(number(value, 1) for value in box)] for score, label, box in rows]


def _threshold_keeping_a_few(scores: torch.Tensor) -> float:
    """The highest slider position (0.01 steps) that keeps at least 3 detections, away from every score by more
    than float noise."""
    for step in range(99, 0, -1):
        threshold = step / 100
        if (scores > threshold).sum() >= 3 and not ((scores - threshold).abs() < 1e-4).any():
            return threshold
    raise AssertionError(f"no threshold keeps 3 of the scores {scores.tolist()}")


# ------------------------------------------------------------------------------------------------------ the tests


def test_the_page_shows_what_detect_gives_at_the_slider_threshold(page, folder, tmp_path):
    image_path = tmp_path / "shapes.png"  # not square: boxes must come back in the image's own pixels
    PIL.Image.fromarray(render_synthetic_example(seed=7, split="test", index=0, image_size=(70, 90))[0]).save(image_path)
    model, processor = load_model(str(folder), device="cpu")
    image = read_image(image_path)
    app = load_app()
    threshold = _threshold_keeping_a_few(detect(model, processor, [image], 0.0)[0]["scores"])
    expected = detect(model, processor, [image], threshold)[0]
    assert 3 <= len(expected["scores"]) <= 10  # few enough that the table renders every row

    page.locator("#upload input[type=file]").set_input_files(image_path)
    at_default = len(detect(model, processor, [image], app.DEFAULT_THRESHOLD)[0]["scores"])
    assert _wait_for(page, _shown_row_count, at_default) == at_default
    page.get_by_label("range slider for Score threshold").fill(str(threshold))
    assert page.get_by_label("number input for Score threshold").input_value() == str(threshold)

    assert _wait_for(page, _shown_rows, _as_shown(expected)) == _as_shown(expected)
    assert _shown_row_count(page) == len(expected["scores"])
    drawn = _pixels(app.annotate(image, expected, dict(enumerate(CLASSES))))
    assert _wait_for(page, _shown_pixels, drawn) == drawn  # pixel for pixel: the page shows a PNG
    page.screenshot(path=tmp_path / "demo.png", full_page=True)


@pytest.mark.parametrize(("name", "message"), [
    ("notes.png", "notes.png cannot be read as an image"),  # passes the upload's file-type check, fails to decode
    ("notes.txt", "Invalid file type: notes.txt"),  # refused by the upload's file-type check
])
def test_a_bad_upload_shows_an_error_on_the_page_and_no_traceback(page, tmp_path, name, message):
    (tmp_path / name).write_text("These are notes, not pixels.\n")
    page.locator("#upload input[type=file]").set_input_files(tmp_path / name)
    toast = page.get_by_test_id("toast-body")
    toast.wait_for()
    assert message in toast.inner_text()
    assert "gradio" not in toast.inner_text()  # the server's copy of the upload is not named
    assert "Traceback" not in page.inner_text("body")
    assert _shown_row_count(page) == 0
    page.wait_for_timeout(500)  # for the picture only: the message has faded in
    page.screenshot(path=tmp_path / "demo-bad-upload.png", full_page=True)
