"""The playground page at `GET /` of the HTTP port, in a real browser (headless Debian chromium
through Selenium) against the real server: samples, a new seed, interpolation, latent sliders,
an upload's reconstruction and score, server errors as messages, and tokens. Every wait is on an
event the page shows (an element, an attribute, a changed image), never on the clock.

With PLAYGROUND_SCREENSHOT=path set, it saves its screenshot of the working page there; a test
run never writes into the repository otherwise."""

import base64
import math
import os

import pytest
from PIL import Image, ImageDraw
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ServerProcess

TOKEN = "playground-secret-token"
WAIT = 60  # seconds: only ends a test that would otherwise hang (two shared cores, a cold browser)


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    proc = ServerProcess(model_repo, tmp_path_factory.mktemp("playground") / "server.log", http=True)
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def token_server(model_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground-tokens")
    (folder / "tokens").write_text(f"{TOKEN}\n")
    proc = ServerProcess(model_repo, folder / "server.log", "--auth-token-file", str(folder / "tokens"), http=True)
    yield proc
    proc.terminate()


def wait(driver, condition, message: str):
    return WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def grid_sources(driver) -> list[str]:
    return [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#grid img.sample")]


def wait_for_grid(driver, count: int) -> list[str]:
    def shown(d):
        sources = grid_sources(d)
        return sources if len(sources) == count and all(s.startswith("data:image/png;base64,") for s in sources) else False

    return wait(driver, shown, f"a grid of {count} samples")


def src_of(driver, element_id: str) -> str | None:
    return driver.find_element(By.ID, element_id).get_attribute("src")


def wait_for_new_src(driver, element_id: str, old: str | None) -> str:
    def changed(d):
        src = src_of(d, element_id)
        return src if src and src != old and src.startswith("data:image/") else False

    return wait(driver, changed, f"#{element_id} shows a new image")


def messages(driver) -> list[str]:
    return [m.text for m in driver.find_elements(By.CSS_SELECTOR, "#messages .message")]


def idle(driver, section: str) -> None:
    wait(driver, lambda d: d.find_element(By.ID, section).get_attribute("data-busy") is None, f"#{section} done")


def test_playground(browser, server, tmp_path):
    d = browser
    d.get(server.http_url + "/")
    assert d.title == "VAE playground"

    # The grid appears on its own: the default model, seed 0.
    first = wait_for_grid(d, 24)
    assert "digits v1" in d.find_element(By.ID, "model-info").text
    assert "1×8×8" in d.find_element(By.ID, "model-info").text
    assert len(set(first)) > 1, "samples of one seed should differ from each other"

    # A new seed gives new pixels; the old seed, typed back, the same ones again.
    d.find_element(By.ID, "new-seed").click()
    second = wait(d, lambda d: (s := grid_sources(d)) != first and len(s) == 24 and s, "a new seed's grid")
    assert d.find_element(By.ID, "seed").get_attribute("value") != "0"
    assert not set(second) & set(first)
    old_cell = d.find_element(By.CSS_SELECTOR, "#grid img.sample")
    seed = d.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("0", Keys.ENTER)
    wait(d, EC.staleness_of(old_cell), "the grid redrawn")
    assert wait_for_grid(d, 24) == first

    # Pick two samples as A and B, interpolate, and move along the path.
    cells = d.find_elements(By.CSS_SELECTOR, "#grid button")
    cells[0].click()
    cells[5].click()
    assert cells[0].get_attribute("data-pick") == "A" and cells[5].get_attribute("data-pick") == "B"
    assert d.find_element(By.CSS_SELECTOR, "#slot-a img").get_attribute("src") == first[0]
    assert d.find_element(By.CSS_SELECTOR, "#slot-b img").get_attribute("src") == first[5]
    d.find_element(By.ID, "interpolate").click()
    slider = d.find_element(By.ID, "interp-slider")
    wait(d, lambda d: slider.is_enabled(), "the interpolation slider")
    assert slider.get_attribute("max") == "8"  # 9 steps
    frames = [img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#interp-strip img")]
    assert len(frames) == 9
    start = wait_for_new_src(d, "interp-image", None)
    assert start == frames[0]
    slider.send_keys(Keys.END)
    assert wait_for_new_src(d, "interp-image", start) == frames[-1]
    assert d.find_element(By.ID, "interp-step").text == "step 9 of 9"
    slider.send_keys(Keys.LEFT, Keys.LEFT, Keys.LEFT, Keys.LEFT)
    assert wait_for_new_src(d, "interp-image", frames[-1]) == frames[4]

    # Latent sliders from A: moving one decodes a new image.
    d.find_element(By.ID, "explore-a").click()
    decoded = wait_for_new_src(d, "latent-image", None)
    sliders = d.find_elements(By.CSS_SELECTOR, "#latent-sliders input[type=range]")
    assert [s.get_attribute("data-dim") for s in sliders] == ["0", "1", "2", "3"]
    sliders[0].send_keys(Keys.END)  # z0 = 3
    wait_for_new_src(d, "latent-image", decoded)

    # Upload an image: its reconstruction and its score.
    picture = Image.new("RGB", (48, 48), "black")
    ImageDraw.Draw(picture).ellipse((10, 4, 38, 44), outline="white", width=6)  # a zero
    picture.save(tmp_path / "zero.png")
    d.find_element(By.ID, "recon-file").send_keys(str(tmp_path / "zero.png"))
    wait_for_new_src(d, "recon-output", None)
    assert d.find_element(By.ID, "recon-input").get_attribute("src").startswith("data:image/png;base64,")
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#score tr[data-key=bits_per_dim]"), "the score")
    score = {row.get_attribute("data-key"): float(row.find_element(By.TAG_NAME, "td").text)
             for row in d.find_elements(By.CSS_SELECTOR, "#score tr")}  # fmt: skip
    assert set(score) == {"elbo", "reconstruction", "kl", "log_likelihood", "bits_per_dim"}
    assert all(math.isfinite(v) for v in score.values())
    assert score["elbo"] < 0 < score["bits_per_dim"] and score["kl"] >= 0
    idle(d, "reconstruction")
    idle(d, "latents")
    assert messages(d) == []

    d.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    assert d.save_screenshot(os.environ.get("PLAYGROUND_SCREENSHOT", str(tmp_path / "playground.png")))

    # The server's own refusals show as messages, and the next success clears them.
    steps = d.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("1", Keys.ENTER)
    wait(d, lambda d: any("steps: 1" in m for m in messages(d)), "the server's error shown")
    assert any(m.startswith("POST /v1/models/digits/interpolate: 400") for m in messages(d))
    assert d.find_elements(By.CSS_SELECTOR, "#interp-strip img"), "the last path stays shown"
    steps.clear()
    steps.send_keys("3", Keys.ENTER)
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#interp-strip img")) == 3, "a 3-step path")
    wait(d, lambda d: messages(d) == [], "the error cleared")

    # An uploaded image as an end point: the path from A to it.
    d.find_element(By.ID, "file-b").send_keys(str(tmp_path / "zero.png"))
    wait(d, lambda d: "zero.png" in d.find_element(By.ID, "slot-b").text, "B is the upload")
    assert d.find_element(By.CSS_SELECTOR, "#slot-b img").get_attribute("src").startswith("data:image/png;base64,")
    old_frame = d.find_element(By.CSS_SELECTOR, "#interp-strip img")
    d.find_element(By.ID, "interpolate").click()
    wait(d, EC.staleness_of(old_frame), "the new path")
    uploaded = [img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#interp-strip img")]
    assert len(uploaded) == 3 and uploaded[0] == frames[0] and uploaded[-1] != frames[-1]
    assert messages(d) == []

    # A file the browser cannot read is a message too, not a blank section.
    (tmp_path / "broken.png").write_bytes(b"not a png")
    d.find_element(By.ID, "recon-file").send_keys(str(tmp_path / "broken.png"))
    wait(d, lambda d: any("cannot decode" in m for m in messages(d)), "the unreadable file reported")


def test_playground_with_tokens(browser, token_server):
    d = browser
    d.get(token_server.http_url + "/")  # the page itself needs no token

    # No token: the server's refusal shows as a message; the page stays, with no grid.
    wait(d, lambda d: any("401" in m for m in messages(d)), "the refusal shown")
    (message,) = messages(d)
    assert "GET /v1/models" in message and "no bearer token" in message and "Token field" in message
    assert d.find_element(By.ID, "model-info").text == "Not connected."
    assert d.find_element(By.ID, "samples").is_displayed() and grid_sources(d) == []

    # A wrong token: refused again.
    token = d.find_element(By.ID, "token")
    token.send_keys("wrong", Keys.ENTER)
    wait(d, lambda d: any("unknown token" in m for m in messages(d)), "the wrong token refused")

    # The token: the grid shows and the message goes.
    token.clear()
    token.send_keys(TOKEN, Keys.ENTER)
    wait_for_grid(d, 24)
    wait(d, lambda d: messages(d) == [], "the message cleared")
    assert "digits v1" in d.find_element(By.ID, "model-info").text

    # Every call carries it: an interpolation between two picked samples works too.
    cells = d.find_elements(By.CSS_SELECTOR, "#grid button")
    cells[1].click()
    cells[2].click()
    d.find_element(By.ID, "interpolate").click()
    wait_for_new_src(d, "interp-image", None)
    assert messages(d) == []


def test_images_drawn_in_the_browser(browser, server, tmp_path):
    """For a model without preprocessing the page scales an upload itself: fit into H x W, padded
    with black, as the server's own `pad` does. Checked on the page's function, on a known image."""
    d = browser
    d.get(server.http_url + "/")
    wait_for_grid(d, 24)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (20, 10), "white").save(wide)
    data_url = "data:image/png;base64," + base64.b64encode(wide.read_bytes()).decode()
    tensor = d.execute_async_script("toTensor(arguments[0]).then((t) => arguments[1](t.tensor), (e) => arguments[1](String(e)))", data_url)
    assert tensor["shape"] == [1, 1, 8, 8] and tensor["dtype"] == "uint8"
    rows = [tensor["data"][8 * y : 8 * y + 8] for y in range(8)]
    assert rows == [[0] * 8] * 2 + [[255] * 8] * 4 + [[0] * 8] * 2  # 20x10 -> 8x4, centred


def test_api_docs_render_offline(browser, server):
    """Swagger UI from the port itself: its operations render, with nothing fetched from elsewhere."""
    d = browser
    d.get(server.http_url + "/docs")
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10, "the API's operations rendered")
    paths = {e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/models/{name}/sample.png" in {p.replace("\u200b", "") for p in paths}
    hosts = d.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
    assert hosts and set(hosts) == {server.http_url.removeprefix("http://")}, hosts
