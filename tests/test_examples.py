"""The examples users copy (examples/): quickstart, the anchor picture, the Endpoint handler and the
Gradio Space, each run on a tiny random VQA checkpoint with a tiny random detector and a real photo,
and each checked against what the pipeline or the model itself gives."""

import base64
import importlib.util

import numpy as np
import PIL.Image
import pytest
import test_pipelines
from conftest import REPO, broken_images, png_header
from test_pipelines import QUESTIONS
from transformers import pipeline

from cmal.training.data import synthetic


def load_example(relative: str):
    """Import an example script as a module (examples/ is not a package)."""
    path = REPO / "examples" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


detector_folder, photos = test_pipelines.detector_folder, test_pipelines.photos  # the fixtures: a checkpoint, JPEGs
visualize = load_example("visualize_anchors.py")
PALETTE = [np.array(color) for color in visualize.PALETTE]


@pytest.fixture(scope="module")
def vqa(detector_folder):
    return pipeline("visual-question-answering", model=str(detector_folder), trust_remote_code=True)


def count(pixels: np.ndarray, color) -> int:
    """Pixels of exactly `color`: Pillow draws lines, outlines and bars unblended, text and photos rarely hit it."""
    return int((pixels == np.asarray(color)).all(-1).sum())


def test_quickstart_prints_the_pipeline_answers(detector_folder, photos, vqa, capsys):
    photo, question = str(photos / "astronaut.jpg"), QUESTIONS[0]
    load_example("quickstart.py").main(["--model", str(detector_folder), "--image", photo, "--question", question,
                                        "--top_k", "3"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"Q: {question}"
    expected = vqa(image=photo, question=question, top_k=3)
    assert [line.split(maxsplit=1) for line in lines[1:4]] == [[f"{a['score']:.4f}", a["answer"]] for a in expected]
    assert {a["answer"] for a in expected} <= set(test_pipelines.ANSWERS.values())
    # the untrained detector is sure of nothing in the photo, and the question's words are all known: one caveat
    assert lines[4:] == ["the detector is sure of nothing in this image: it is unlike the checkpoint's training images, "
                         "and the answers are guesses"]  # fmt: skip
    load_example("quickstart.py").main(["--model", str(detector_folder), "--image", photo, "--question", "what is on the table?"])
    assert "unknown words (the checkpoint reads them as [UNK]): table" in capsys.readouterr().out


def test_quickstart_defaults_to_what_the_readme_commands_make(tmp_path, monkeypatch, capsys):
    """No Hub id by default: the folder the documented commands make, or an error that lists those commands."""
    quickstart = load_example("quickstart.py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        quickstart.main([])
    error = capsys.readouterr().err
    assert "outputs/vqa-synthetic-detector does not exist yet" in error
    assert "    python training/train_detector.py\n    accelerate launch -q --config_file training/configs/one_process.yaml training/pretrain.py --detector" in error
    image = PIL.Image.open(quickstart.default_image(synthetic_images=60))
    assert image.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
    with pytest.raises(SystemExit, match="outputs/vqa-synthetic-detector does not exist yet; make it .*\n    python training/train_detector.py\n"):
        load_example("space/app.py").local_default()  # the Space's default is the quickstart's


def test_draw_anchors_draws_boxes_fills_links_and_bars():
    """A known figure: two regions on a grey image, the word "cat" linked to region 0 only, attention 3:1."""
    image = PIL.Image.new("RGB", (200, 100), (128, 128, 128))
    boxes, attention = [[0.1, 0.2, 0.4, 0.8], [0.6, 0.1, 0.9, 0.5]], [0.3, 0.1]
    figure = visualize.draw_anchors(image, boxes, ["#0 cat", "#1 dog"], ["a", "cat", "and", "a", "cup"], [(1, 0)],
                                    attention, side=400)  # fmt: skip
    pixels = np.asarray(figure).astype(int)
    width, height = 400, 200  # the picture, scaled by 2
    assert figure.width == width + visualize.PANEL_WIDTH and figure.height > height + visualize.LINK_GAP
    np.testing.assert_array_equal(pixels[100, 40], PALETTE[0])  # left edge of box 0, mid height
    np.testing.assert_array_equal(pixels[60, 240], PALETTE[1])  # left edge of box 1
    # Fill alpha in proportion to [CLS] attention: the most attended box gets MAX_FILL.
    for (y, x), color, weight in (((130, 120), PALETTE[0], 0.3), ((70, 320), PALETTE[1], 0.1)):
        alpha = int(visualize.MAX_FILL * weight / 0.3) / 255
        np.testing.assert_allclose(pixels[y, x], 128 * (1 - alpha) + color * alpha, atol=1.5)
    # The link: only region 0's colour crosses the gap between the picture and the words, and underlines "cat".
    below = pixels[height : height + visualize.LINK_GAP, :width]
    assert count(below, PALETTE[0]) > 20 and count(below, PALETTE[1]) == 0
    words = pixels[height + visualize.LINK_GAP :]
    assert count(words, PALETTE[0]) > 20 and count(words, PALETTE[1]) == 0
    # The bars (after each region's colour swatch): lengths 3:1.
    bars = []
    for color in PALETTE[:2]:
        columns = np.flatnonzero((pixels[:height, width:] == color).all(-1).any(0))
        runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
        assert len(runs) == 2  # swatch, bar
        bars.append(len(runs[-1]) - 1)
    assert abs(bars[0] - 3 * bars[1]) <= 3


def assert_regions_drawn(figure, image, explained, side=512):
    """Every region's colour appears in the picture (its box), beyond what the photo itself holds, and every
    anchor's colour in the gap below it (its link line)."""
    scale = side / max(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    drawn = np.asarray(figure)[:height, :width].astype(int)
    plain = np.asarray(image.convert("RGB").resize((width, height), PIL.Image.LANCZOS)).astype(int)
    assert figure.width == width + visualize.PANEL_WIDTH
    for i in range(len(explained["boxes"])):
        assert count(drawn, PALETTE[i]) >= count(plain, PALETTE[i]) + 20, f"region {i} is not drawn"
    top = max(height, 40 + visualize.ROW * len(explained["boxes"]))
    gap = np.asarray(figure)[top : top + visualize.LINK_GAP].astype(int)
    for _, r in explained["links"]:
        assert count(gap, PALETTE[r]) > 10, f"no link line to region {r}"


def test_visualize_anchors_on_a_photo(detector_folder, photos, tmp_path):
    output = tmp_path / "anchors.png"
    command = ["--model", str(detector_folder), "--image", str(photos / "astronaut.jpg"), "--output", str(output)]
    # the random detector's tags (they depend on how transformers initialises it): two of them make the anchors
    tags = [" ".join(tag.split()[1:-1]) for tag in visualize.main([*command, "--text", "what is this?"])["tags"]]
    named = [tag for tag in dict.fromkeys(tags) if " " not in tag][:2]  # in order of detection
    articles = ["an" if name[0] in "aeiou" else "a" for name in named]
    explained = visualize.main([*command, "--text", f"is there {articles[0]} {named[0]} or {articles[-1]} {named[-1]}?"])
    assert explained["words"] == ["is", "there", articles[0], named[0], "or", articles[-1], named[-1], "?"]
    assert explained["links"] and len(explained["tags"]) == 8  # config.detector_num_regions, all kept
    for w, r in explained["links"]:  # an anchor joins a word and a region of the same concept
        assert explained["tags"][r].split()[1] == explained["words"][w]
    unlinked = {r for r, tag in enumerate(tags) if tag not in named}
    assert not unlinked & {r for _, r in explained["links"]}
    attention = np.array(explained["cls_attention"])
    assert ((attention > 0) & (attention < 1)).all() and attention.sum() <= 1
    assert_regions_drawn(PIL.Image.open(output), PIL.Image.open(photos / "astronaut.jpg"), explained)


def test_visualize_anchors_on_a_synthetic_scene(tmp_path):
    world_dir = synthetic.build_world(tmp_path / "world", num_images=3)
    world = synthetic.load_world(world_dir)
    test_pipelines.save_synthetic_vqa(world, tmp_path / "model")

    output = tmp_path / "scene.png"
    explained = visualize.main(["--model", str(tmp_path / "model"), "--synthetic_world", world_dir,
                                "--synthetic_index", "0", "--output", str(output)])  # fmt: skip
    captions = [row["text"] for split in world["captions"].values() for row in split if row["image_id"] == "synthetic-000000"]
    assert "".join(explained["words"]) == captions[0].replace(" ", "")  # the words of the scene's first caption
    row = world["regions"].with_format("numpy")[list(world["regions"]["image_id"]).index("synthetic-000000")]
    assert len(explained["tags"]) == len(row["scores"])  # at most 6 objects + 2 distractors: all drawn
    np.testing.assert_allclose(explained["boxes"], row["boxes"], atol=1e-6)  # the store keeps them best first
    lexicon = synthetic.synthetic_lexicon()
    assert explained["links"]  # captions name shapes
    for w, r in explained["links"]:
        assert explained["tags"][r].split()[1] == synthetic.CONCEPT_NAMES[lexicon.concept_of(explained["words"][w])]
    scene = synthetic.render(synthetic.scene_of(0, 0))
    assert_regions_drawn(PIL.Image.open(output), scene, explained)


@pytest.fixture(scope="module")
def handler(detector_folder):
    return load_example("endpoint/handler.py").EndpointHandler(str(detector_folder))


def test_endpoint_handler_answers_like_the_pipeline(handler, photos, vqa):
    photo = photos / "astronaut.jpg"
    encoded = base64.b64encode(photo.read_bytes()).decode()
    request = {"inputs": {"image": encoded, "question": QUESTIONS[2]}, "parameters": {"top_k": 3}}
    expected = vqa(image=str(photo), question=QUESTIONS[2], top_k=3)
    assert handler(request) == expected and len(expected) == 3
    data_url = {"inputs": {"image": "data:image/jpeg;base64," + encoded, "question": QUESTIONS[2]}}
    assert handler(data_url) == vqa(image=str(photo), question=QUESTIONS[2])  # top_k 5 by default


@pytest.mark.parametrize(
    "inputs, parameters, message",
    [
        ("astronaut", None, r"`inputs` must be an object \{\"image\": <base64 image>, \"question\": <string>\}, got str"),
        ({"question": "is there a cup?"}, None, r"`inputs.image` must be a base64-encoded image string, got NoneType"),
        ({"image": "PHOTO", "question": " "}, None, r"`inputs.question` must be a non-empty string, got ' '"),
        ({"image": "PHOTO"}, {"top_k": 0}, r"`parameters.top_k` must be a positive integer, got 0"),
        ({"image": "PHOTO"}, [3], r"`parameters` must be an object such as \{\"top_k\": 3\}, got list"),
        ({"image": "not base64!", "question": "q"}, None, r"`inputs.image` must be a base64-encoded image, got a string of 11 characters that is not valid base64"),
        ({"image": "PATH", "question": "q"}, None, r"not valid base64"),  # a server path is never read
        ({"image": base64.b64encode(b"hello").decode(), "question": "q"}, None, r"`inputs.image` \(5 bytes of base64\) is not an image Pillow can read"),
    ],
)  # fmt: skip
def test_endpoint_handler_rejects_bad_requests(handler, photos, inputs, parameters, message):
    photo = photos / "astronaut.jpg"
    if isinstance(inputs, dict):
        given = {"PHOTO": base64.b64encode(photo.read_bytes()).decode(), "PATH": str(photo)}
        inputs = {key: given.get(value, value) for key, value in inputs.items()}
        inputs.setdefault("question", "is there a cup?")
    with pytest.raises(ValueError, match=message):
        handler({"inputs": inputs, "parameters": parameters})


def test_endpoint_handler_names_a_body_that_is_not_an_object(handler):
    for body, got in (([{"inputs": {}}], "list"), ("question", "str"), (None, "NoneType")):
        with pytest.raises(ValueError, match=r'^the request body must be a JSON object \{"inputs": .*, got ' + got):
            handler(body)


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict:
    return broken_images(tmp_path_factory.mktemp("broken"))


def test_broken_files_are_named_by_the_pipeline_and_the_handler(handler, vqa, broken):
    for path, message in broken.values():
        with pytest.raises(ValueError, match=r"^`image` " + message):
            vqa(image=str(path), question=QUESTIONS[0])
        raw = path.read_bytes()
        request = {"inputs": {"image": base64.b64encode(raw).decode(), "question": QUESTIONS[0]}}
        if raw:
            with pytest.raises(ValueError, match=rf"^`inputs.image` \({len(raw)} bytes of base64\) " + message):
                handler(request)
        else:  # an empty string is no image at all
            with pytest.raises(ValueError, match=r"^`inputs.image` is an empty string: an empty file, or no image attached"):
                handler(request)


def test_space_app_answers_and_draws(detector_folder, photos, vqa):
    gr = pytest.importorskip("gradio")
    demo = load_example("space/app.py").build_demo(str(detector_folder))
    assert isinstance(demo, gr.Blocks)
    functions = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns  # a dict from gradio 5 on
    predict = next(f.fn for f in functions if f.name == "predict")
    photo = PIL.Image.open(photos / "astronaut.jpg")
    answers, picture, notes = predict(photo, QUESTIONS[0], 3)
    assert answers == {a["answer"]: a["score"] for a in vqa(image=photo, question=QUESTIONS[0], top_k=3)}
    assert isinstance(picture, PIL.Image.Image) and picture.width == 512 + visualize.PANEL_WIDTH
    # what the checkpoint knows is on the page, and a photo its (untrained) detector is sure of nothing in says so
    concepts = ", ".join(vqa.model.config.concept_names)
    texts = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any(f"its detector finds {concepts}, and it answers with one of 5 answers" in text for text in texts)
    assert notes.startswith("**The detector is sure of nothing in this image**") and concepts in notes
    _, _, notes = predict(photo, "what is on the table?", 3)
    assert notes.startswith("**Unknown words: table**")
    with pytest.raises(gr.Error):
        predict(None, QUESTIONS[0], 3)


@pytest.fixture(scope="module")
def huge_pngs(tmp_path_factory) -> dict:
    """PNG headers that claim 150 and 210 megapixels (an image of that size takes 0.15-2 GB to decode): a check
    made after decoding would name them truncated instead."""
    folder = tmp_path_factory.mktemp("huge")
    paths = {}
    for megapixels, size in ((150, (12500, 12000)), (210, (15000, 14000))):
        paths[megapixels] = folder / f"{megapixels}mp.png"
        paths[megapixels].write_bytes(png_header(*size, color_type=2))
    return paths


@pytest.mark.parametrize("megapixels, message", [
    (150, r"is 12500x12000 = 150.0 megapixels, above the image processor's `max_image_pixels` \(64 MP\): refused before decoding"),
    (210, r"is too large to decode safely \(Image size \(210000000 pixels\) exceeds limit"),
])  # fmt: skip
def test_huge_images_are_refused_before_decoding(handler, vqa, huge_pngs, megapixels, message):
    path = huge_pngs[megapixels]
    with pytest.raises(ValueError, match=r"`image` " + message):
        vqa(image=str(path), question=QUESTIONS[0])
    with pytest.raises(ValueError, match=r"`images\[0\]` " + message):
        vqa.processor(text=QUESTIONS[0], images=[str(path)])
    encoded = base64.b64encode(path.read_bytes()).decode()
    with pytest.raises(ValueError, match=rf"`inputs.image` \({path.stat().st_size} bytes of base64\) " + message):
        handler({"inputs": {"image": encoded, "question": QUESTIONS[0]}})


def test_a_long_question_is_truncated_with_a_warning(vqa, photos):
    photo = photos / "astronaut.jpg"
    limit = min(vqa.processor.tokenizer.model_max_length, vqa.model.config.max_position_embeddings)
    long_question = QUESTIONS[0] + " and" * 3000
    with pytest.warns(UserWarning, match=rf"`question` has \d+ word pieces; only the first {limit} are read"):
        answers = vqa(image=str(photo), question=long_question, top_k=2)
    assert len(answers) == 2


def test_space_shows_errors_to_the_user(detector_folder, huge_pngs):
    gr = pytest.importorskip("gradio")
    demo = load_example("space/app.py").build_demo(str(detector_folder))
    functions = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    predict = next(f.fn for f in functions if f.name == "predict")
    with pytest.raises(gr.Error, match=r"The image is 12500x12000 = 150.0 megapixels"):
        predict(str(huge_pngs[150]), QUESTIONS[0], 3)
