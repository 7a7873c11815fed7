"""The Gradio Space used as its users use it: served on localhost, driven by a real headless Chromium
(Debian's `chromium`, through playwright with the system browser) and called through `gradio_client`.

The page must show the answers the pipeline gives for the uploaded photo, draw the anchor picture and
show errors as messages; a screenshot of the answered page is saved (to `$CMAL_SCREENSHOT_DIR` when set).
Without Chromium or playwright the tests skip, unless `CMAL_REQUIRE_BROWSER=1` (CI sets it) makes that
an error."""

import os
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest
import test_examples
from test_pipelines import QUESTIONS


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the `chromium` fixture says so
    expect = sync_playwright = None


gr = pytest.importorskip("gradio")
detector_folder, photos, vqa, huge_pngs, broken = (test_examples.detector_folder, test_examples.photos, test_examples.vqa,
                                                   test_examples.huge_pngs, test_examples.broken)  # fmt: skip
# Chromium as root in a closed network: no sandbox, and none of its background connections.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip
ANSWER_TIMEOUT_MS = 120_000  # a first answer on a loaded 2-core machine takes seconds; a hang must still fail


def required(what: str):
    if os.environ.get("CMAL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what}, and CMAL_REQUIRE_BROWSER=1 forbids skipping the browser tests")
    pytest.skip(what)


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        required("no Chromium on PATH (Debian: apt-get install chromium)")
    if sync_playwright is None:
        required("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def space(detector_folder, photos):
    """The app of examples/space/app.py on a free local port, with a photo as its example row."""
    demo = test_examples.load_example("space/app.py").build_demo(
        str(detector_folder), examples=[[str(photos / "coffee.jpg"), QUESTIONS[1]]])
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


@pytest.fixture
def page(chromium, space):
    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(space)
    yield page
    page.close()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("CMAL_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_the_space_answers_an_uploaded_photo_in_a_browser(page, vqa, photos, tmp_path):
    photo, question = photos / "astronaut.jpg", QUESTIONS[0]
    page.locator("input[type=file]").first.set_input_files(str(photo))
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Ask").click()
    top = page.get_by_test_id("label-output-value")
    top.wait_for(timeout=ANSWER_TIMEOUT_MS)
    anchor_picture = page.locator("#anchor-picture img")
    anchor_picture.wait_for(timeout=ANSWER_TIMEOUT_MS)

    expected = vqa(image=str(photo), question=question, top_k=5)  # the slider's default
    assert top.inner_text().strip() == expected[0]["answer"]
    rows = [row.inner_text().split() for row in page.locator("[data-testid$='-confidence-set']").all()]
    assert rows == [[a["answer"], f"{round(100 * a['score'])}%"] for a in expected]
    width = anchor_picture.evaluate("img => img.naturalWidth")
    assert width == 512 + test_examples.visualize.PANEL_WIDTH  # the picture visualize_anchors draws
    # the detector (untrained here) is sure of nothing in the photo: the page says so and names what it knows
    concepts = ", ".join(vqa.model.config.concept_names)
    expect(page.locator("#caveats")).to_contain_text(f"The detector is sure of nothing in this image: this checkpoint "
                                                     f"knows these concepts: {concepts}.")  # fmt: skip
    expect(page.get_by_text(f"its detector finds {concepts}")).to_be_visible()

    path = screenshot_path(tmp_path, "space-answer.png")
    page.screenshot(path=str(path), full_page=True)
    with PIL.Image.open(path) as shot:
        assert shot.format == "PNG" and shot.width == 1280 and shot.height >= 700


@pytest.mark.parametrize("fill, message", [
    ({"question": QUESTIONS[0]}, "Upload an image first."),
    ({"image": "astronaut.jpg", "question": "   "}, "Type a question about the image."),
])  # fmt: skip
def test_the_space_shows_errors_on_the_page(page, photos, fill, message, tmp_path):
    if "image" in fill:
        page.locator("input[type=file]").first.set_input_files(str(photos / fill["image"]))
    page.get_by_label("Question").fill(fill["question"])
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_test_id("toast-text")).to_have_text(message, timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # the toast fades in
    page.screenshot(path=str(screenshot_path(tmp_path, f"space-error-{'question' if 'image' in fill else 'image'}.png")))
    assert page.get_by_test_id("label-output-value").count() == 0  # no answer shown


@pytest.mark.parametrize("name", ["empty.jpg", "text.jpg", "truncated.jpg", "400mp.png"])
def test_the_space_names_a_broken_upload_on_the_page(page, broken, name, tmp_path):
    """Files gradio itself used to open, failing as a bare "Error" badge: each is now the processor's message."""
    path, message = broken[name]
    page.locator("input[type=file]").first.set_input_files(str(path))
    page.get_by_label("Question").fill(QUESTIONS[0])
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_test_id("toast-text")).to_have_text(re.compile("^The image " + message), timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # the toast fades in
    page.screenshot(path=str(screenshot_path(tmp_path, f"space-error-{Path(name).stem}.png")))
    assert page.get_by_test_id("label-output-value").count() == 0


def test_the_space_example_row_fills_the_inputs(page, photos):
    page.get_by_test_id("dataset-cell-0-1").click()
    expect(page.get_by_label("Question")).to_have_value(QUESTIONS[1])
    expect(page.get_by_test_id("image").locator("img")).to_have_attribute("src", re.compile(r"coffee\.jpg$"))


def test_the_space_api_answers_through_gradio_client(space, vqa, photos, huge_pngs, broken):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(space, verbose=False)
    photo = photos / "coffee.jpg"
    answers, picture, notes = client.predict(handle_file(str(photo)), QUESTIONS[1], 3, api_name="/predict")
    assert "The detector is sure of nothing in this image" in notes
    expected = vqa(image=str(photo), question=QUESTIONS[1], top_k=3)
    assert answers["label"] == expected[0]["answer"]
    assert [c["label"] for c in answers["confidences"]] == [a["answer"] for a in expected]
    assert [c["confidence"] for c in answers["confidences"]] == pytest.approx([a["score"] for a in expected], abs=1e-5)
    with PIL.Image.open(picture) as drawn:
        assert drawn.width == 512 + test_examples.visualize.PANEL_WIDTH
    # errors arrive as their message, not a generic AppError
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, QUESTIONS[1], 3, api_name="/predict")
    with pytest.raises(AppError, match=r"The image is 12500x12000 = 150.0 megapixels"):
        client.predict(handle_file(str(huge_pngs[150])), QUESTIONS[1], 3, api_name="/predict")
    for path, message in broken.values():  # the whole class, gradio opening none of them first
        with pytest.raises(AppError, match="^The image " + message):
            client.predict(handle_file(str(path)), QUESTIONS[1], 3, api_name="/predict")
