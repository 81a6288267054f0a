"""The demo page, served in-process on a free port: through gradio_client, and in headless Chromium
where it is installed.

`python -m tests.test_demo CHECKPOINT IMAGE EXAMPLES OUT.png` takes the page's screenshot (docs/demo.png)."""

import shutil
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from vitlab import ViT, ViTConfig, demo
from vitlab.errors import VitlabError
from vitlab.export import export
from vitlab.inference import load_model, predict
from tests.conftest import CLASS_COLOURS, write_image_folder

TIMEOUT = 30  # seconds for any one answer from the page: a hang fails the test, not the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page(NamedTuple):
    url: str
    checkpoint: Path
    examples: Path
    server: object  # the running gr.Blocks


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of an untrained model with a random head (so that probabilities differ), with three
    colour classes and two example images of each."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=32, depth=1, heads=2, patch_size=8, num_classes=3)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.class_names = list(CLASS_COLOURS)
    model.image_mean, model.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    checkpoint = folder / "model.safetensors"
    export(model, "safetensors", checkpoint)
    examples = write_image_folder(folder / "examples", per_class=2)
    port = free_port()
    server = demo.serve(checkpoint, port=port, examples=examples, block=False)
    yield Page(f"http://127.0.0.1:{port}/", checkpoint, examples, server)
    server.close()


@pytest.fixture(scope="module")
def client(page):
    return Client(page.url, verbose=False, download_files=False)


def expected_top(checkpoint: Path, image: Path) -> list[dict]:
    """[{'class', 'probability'}, ...] as `vitlab predict` says."""
    return list(predict(load_model(checkpoint), [image]))[0]["top"]


def ask(client: Client, path: Path):
    """The page's answer for one upload: (label, rollout image)."""
    return client.submit(handle_file(str(path)), api_name="/predict").result(timeout=TIMEOUT)


def test_upload_gives_the_top_classes_and_the_rollout(page, client):
    image = page.examples / "green" / "0.png"
    label, rollout = ask(client, image)
    expected = expected_top(page.checkpoint, image)
    assert label["label"] == expected[0]["class"]
    assert 1 <= len(label["confidences"]) <= demo.TOP_K
    assert [c["label"] for c in label["confidences"]] == [e["class"] for e in expected]
    assert [c["confidence"] for c in label["confidences"]] == pytest.approx([e["probability"] for e in expected],
                                                                          abs=1e-5)
    assert rollout["path"].endswith(".png")
    assert page.server.server_name == "127.0.0.1"  # only this machine can reach it


@pytest.mark.parametrize("name, content", [
    ("notes.txt", b"not an image"),
    ("notes.png", b"not an image either"),
    ("cut.png", None),  # a PNG cut short
])
def test_bad_upload_gives_a_message_and_the_page_keeps_answering(page, client, tmp_path, name, content):
    good = page.examples / "red" / "0.png"
    bad = tmp_path / name
    bad.write_bytes(content if content is not None else good.read_bytes()[:200])
    with pytest.raises(AppError, match=f"cannot read image {name}"):
        ask(client, bad)
    assert ask(client, good)[0]["label"] in CLASS_COLOURS


def test_too_many_pixels_are_refused_before_decoding(page, client, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "MAX_PIXELS", 1000)  # the server runs in this process
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(big)
    with pytest.raises(AppError, match="big.png is 40x40 pixels; the demo takes up to"):
        ask(client, big)


def test_too_large_a_file_is_refused(page, client, tmp_path):
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(21 * 2**20)  # 21 MiB of nothing, sparse on disk
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        ask(client, huge)


def test_examples_are_taken_in_turn_from_each_folder(tmp_path):
    tree = write_image_folder(tmp_path / "tree", per_class=3)
    picked = demo.pick_examples(tree, count=4)
    assert [p.parent.name for p in picked] == ["blue", "green", "red", "blue"]
    flat = tree / "red"
    assert demo.pick_examples(flat, count=2) == [flat / "0.png", flat / "1.png"]


def test_without_gradio_the_error_says_what_to_install(page, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(VitlabError, match=r'^the demo needs Gradio: pip install -e "\.\[demo\]"$'):
        demo.serve(page.checkpoint, port=free_port(), block=False)


# --- in a browser ----------------------------------------------------------------------------------

LABEL = "[data-testid='label-output-value']"  # Gradio's heading of a gr.Label: the top class


def open_browser(size=(1200, 760)):
    """Headless Chromium driven by chromedriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    browser.set_page_load_timeout(TIMEOUT)
    return browser


def wait(browser, condition, failure: str):
    """condition(browser)'s first true value, polled while the page redraws."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, TIMEOUT, ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, failure)


def texts(browser, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, css)]


def shown_text(browser, css: str, text: str = "") -> str:
    """The text of the first element matching css that shows text (any text if not given), once one does."""
    return wait(browser, lambda b: next((t for t in texts(b, css) if t and text in t), False),
                f"the page shows no {css} with {text!r}")


def element(browser, css: str):
    """The first element matching css, once the page has drawn one."""
    from selenium.webdriver.common.by import By

    return wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, css), f"the page has no {css}")[0]


def drop(browser, path: Path):
    """Give path to the page's image input, as a person picking a file does."""
    element(browser, "input[type='file']").send_keys(str(path))


def clear(browser):
    """Remove the image; wait until the answer to it is gone too."""
    element(browser, "button[aria-label='Remove Image']").click()
    wait(browser, lambda b: not any(texts(b, LABEL)), "the answer stays after the image is removed")


def test_page_in_a_browser(page, tmp_path):
    first, second = demo.pick_examples(page.examples)[:2]  # blue/0.png and green/0.png
    browser = open_browser()
    try:
        browser.get(page.url)
        element(browser, "button.gallery-item").click()  # the first example
        assert shown_text(browser, LABEL) == expected_top(page.checkpoint, first)[0]["class"]
        clear(browser)
        drop(browser, second)
        assert shown_text(browser, LABEL) == expected_top(page.checkpoint, second)[0]["class"]

        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not an image")
        clear(browser)
        drop(browser, bad)
        assert "cannot read image notes.png" in shown_text(browser, ".toast-body", "notes.png")
        drop(browser, first)  # the page still answers
        assert shown_text(browser, LABEL) == expected_top(page.checkpoint, first)[0]["class"]
    finally:
        browser.quit()


def screenshot(checkpoint: Path, image: Path, examples: Path, out: Path):
    """The page of checkpoint showing its answer for image, as a PNG (docs/demo.png)."""
    port = free_port()
    running = demo.serve(checkpoint, port=port, examples=examples, block=False)
    browser = open_browser(size=(1200, 880))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        drop(browser, image)
        shown_text(browser, LABEL, expected_top(checkpoint, image)[0]["class"])
        element(browser, "#rollout img")  # the rollout picture too
        browser.save_screenshot(str(out))
    finally:
        browser.quit()
        running.close()


if __name__ == "__main__":
    screenshot(*map(Path, sys.argv[1:5]))


def test_demo_command_with_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from vitlab.cli import main

    assert main(["demo", "--checkpoint", str(tmp_path / "none.ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.ckpt does not exist" in err[0]
