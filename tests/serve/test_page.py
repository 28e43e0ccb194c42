"""The page at `/` in a real browser (Debian's headless Chromium through selenium): a text search, an
upload that is captioned and gets boxes drawn, and a bad upload, checked as a person sees them; no console
error is allowed, and a screenshot is kept in test-artifacts/."""

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tiny_models import CONFIGS, random_pretrained
from vlp.index.build import build_index
from vlp.serve import create_app
from vlp.serve.run import in_background as running
from vlp.tasks import predict_functions

ARTIFACTS = Path(__file__).parent.parent.parent / "test-artifacts"


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("Debian's chromium and chromium-driver are not installed: `make install` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Tiny random models (a dual encoder, a captioner, a detector) and an index of a few images, served on a
    loopback port."""
    folder = tmp_path_factory.mktemp("page")
    models = {}
    for stem, name in (("clip-tiny", "clip"), ("blip-tiny", "blip"), ("owlvit-tiny", "owlvit")):
        models[name] = random_pretrained(next(c for c in CONFIGS if c.stem == stem), folder / name)
    (folder / "images").mkdir()
    for index, color in enumerate([(220, 30, 30), (30, 30, 220), (30, 170, 60)] * 3):
        image = Image.new("RGB", (64, 64), (235, 235, 235))
        image.paste(color, (10 + index, 12, 40 + index, 44))
        image.save(folder / "images" / f"{index}.png")
    from vlp.checkpoint import save_checkpoint

    clip = save_checkpoint(folder / "clip-checkpoint", family=models["clip"].family, model_config=models["clip"].config,
                           model=models["clip"].model, assets=models["clip"].assets)
    index = build_index(predict_functions(models["clip"], device="cpu"), folder / "images", folder / "index",
                        checkpoint=str(clip), progress=False)
    with running(create_app({**models, "clip": str(clip)}, indices={"shapes": str(index)})) as url:
        yield url, folder


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_a_person_searches_uploads_and_is_told_what_went_wrong(site):
    from selenium.webdriver.common.by import By

    url, folder = site
    driver = _chrome()
    try:
        driver.get(url)
        _wait(driver, lambda d: "models:" in d.find_element(By.ID, "status").text)
        # A text search: the grid shows as many results as asked for.
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("6")
        driver.find_element(By.ID, "query").send_keys("a red square")
        driver.find_element(By.ID, "search").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 6)
        assert driver.find_element(By.ID, "result-count").text == "6 results"
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "page-search.png"))
        # Clicking a result searches by its image.
        driver.find_elements(By.CSS_SELECTOR, "#results .result")[2].click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 6)
        # An upload: its caption, then the boxes the detector draws over it.
        driver.find_element(By.ID, "file").send_keys(str(folder / "images" / "0.png"))
        _wait(driver, lambda d: d.find_element(By.ID, "caption").text.strip() != "")
        driver.find_element(By.ID, "detect-queries").send_keys("circle, square")
        driver.find_element(By.ID, "detect").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#stage .box")) > 0)
        assert driver.find_element(By.ID, "detect-count").text.endswith("boxes")
        driver.save_screenshot(str(ARTIFACTS / "page-upload.png"))
        # A bad upload: a message a person understands.
        bad = folder / "notes.png"
        bad.write_text("these are notes, not an image")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        _wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "notes.png is not an image this page can read" in driver.find_element(By.ID, "error").text
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
