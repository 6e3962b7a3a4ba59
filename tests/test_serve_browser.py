"""The web page of mmstory serve in a real headless browser (Debian's chromium + chromium-driver, driven by
Selenium): upload a bundled emoji image, read its caption, ask a question, read the answer. The screenshot is
saved to $MMSTORY_ARTIFACTS (default: tests/artifacts/serve_page.png). The model is a tiny untrained one, or
the saved model in $MMSTORY_SERVE_MODEL (the README's screenshot: MMSTORY_SERVE_MODEL=runs/emoji_tiny/model)."""
from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import mmstory  # noqa: E402
from conftest import serving, tiny_config  # noqa: E402
from mmstory.model import build_model  # noqa: E402
from mmstory.serve.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver); .ci/run installs them")


def bundled_image(folder: Path) -> Path:
    """The first PNG of the bundled emoji val_style shard."""
    with tarfile.open(ROOT / "data_manifests" / "emoji" / "val_style-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        path = folder / Path(member.name).name
        path.write_bytes(tar.extractfile(member).read())
    return path


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800",
                "--disable-gpu", "--no-first-run", "--use-fake-ui-for-media-stream",  # allow the microphone,
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"):  # a fake one
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_caption_then_ask_in_the_page(tmp_path, browser):
    if os.environ.get("MMSTORY_SERVE_MODEL"):
        model = mmstory.load(os.environ["MMSTORY_SERVE_MODEL"])
    else:
        cfg = tiny_config()
        cfg.decoder.max_len = 96
        torch.manual_seed(0)
        build_model(cfg).save(tmp_path / "model")
        model = mmstory.load(tmp_path / "model")
    image = bundled_image(tmp_path)
    tokens = 12
    with serving(create_app(model)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "model-summary").text)
        browser.find_element(By.ID, "max_new_tokens").clear()
        browser.find_element(By.ID, "max_new_tokens").send_keys(str(tokens))
        browser.find_element(By.ID, "file-input").send_keys(str(image))
        caption = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#thread .bubble.caption")))
        assert browser.find_elements(By.CSS_SELECTOR, "#thread .bubble.error") == []
        expected = mmstory.caption(model, [str(image)], max_new_tokens=tokens)[0]
        assert caption.text.split("\n")[0] == expected or (expected == "" and "batch of 1" in caption.text)
        assert caption.text.endswith("batch of 1)")  # the timings line below the caption
        assert browser.find_element(By.CSS_SELECTOR, "#preview img").get_attribute("alt") == image.name

        for n, question in enumerate(["what is shown?", "which category is this?"], start=1):
            wait.until(EC.element_to_be_clickable((By.ID, "ask")))
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "ask").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thread .bubble.answer")) == n)
            assert browser.find_elements(By.CSS_SELECTOR, "#thread .bubble.user")[-1].text == question
            answer = browser.find_elements(By.CSS_SELECTOR, "#thread .bubble.answer")[-1].text.split("\n")[0]
            expected = mmstory.answer(model, image=str(image), question=question, max_new_tokens=tokens)
            assert answer == expected or (expected == "" and answer.endswith("batch of 1)"))
        assert browser.find_elements(By.CSS_SELECTOR, "#thread .bubble.error") == []

        out = Path(os.environ.get("MMSTORY_ARTIFACTS", ROOT / "tests" / "artifacts"))
        out.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out / "serve_page.png"))
        assert (out / "serve_page.png").stat().st_size > 10_000

        # an unreadable upload shows the server's message in the thread, and the page goes on working
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        browser.find_element(By.ID, "file-input").send_keys(str(bad))
        error = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#thread .bubble.error")))
        assert "not an image file that PIL can read" in error.text


def test_record_from_the_microphone_and_caption_it(tmp_path, browser):
    """Chromium's fake microphone (a beep): record, stop, and the page sends a WAV it encoded itself."""
    cfg = tiny_config()
    cfg.decoder.max_len = 96
    torch.manual_seed(0)
    model = build_model(cfg)
    with serving(create_app(model)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        record = wait.until(EC.visibility_of_element_located((By.ID, "record")))
        record.click()
        wait.until(lambda d: "stop" in d.find_element(By.ID, "record").text)
        WebDriverWait(browser, 10).until(lambda d: d.execute_script("return recorder.chunks.length") >= 4)
        record.click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#thread .bubble.caption, #thread .bubble.error")))
        assert browser.find_elements(By.CSS_SELECTOR, "#thread .bubble.error") == []
        assert browser.find_element(By.CSS_SELECTOR, "#preview .name").text == "recording.wav"
        assert browser.find_element(By.CSS_SELECTOR, "#preview audio") is not None
        stats = browser.execute_script("return fetch('/v1/stats').then(r => r.json())")
        assert stats["requests"] == 1
