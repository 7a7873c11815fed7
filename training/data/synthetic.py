"""A synthetic scene world: CMAL's embedded default dataset, built in seconds with no download.

Real pre-training data is large and slow to fetch. This world is small, generated on the fly and
has known ground truth, so the whole pipeline (region store -> processor -> model -> every
downstream task) can be run and checked on a laptop, and a model that learns nothing shows it.

A scene is 1-6 coloured shapes on a grey, lightly noisy 128x128 canvas. Shapes are the concepts
(concept id = index in `SHAPES`), and texts name them by their name, a synonym or a plural, so
the anchor lexicon (`synthetic_lexicon()`) has real work to do.

Regions are what a detector would give, not the ground truth: boxes are jittered, `num_distractors`
random boxes per image are added, a fraction `tag_noise` of the real regions carry a wrong concept
id, and features are computed from the rendered pixels, never from the scene description.

Region features (`region_features`, "region_features v1"), FEATURE_DIM = 80, all in [0, 1].
Foreground = pixels whose largest channel difference to `BACKGROUND` exceeds `FOREGROUND_THRESHOLD`.

    [0:64]   8x8 foreground occupancy grid of the box (fraction of foreground pixels per cell, row-major)
    [64:67]  mean R, G, B of the foreground pixels (0 when there are none)
    [67:70]  standard deviation of R, G, B of the foreground pixels
    [70:78]  8-bin hue histogram of the chromatic foreground pixels (bin 0 centred on red, 45 degrees a
             bin), divided by the foreground pixel count, so white and black objects give zeros here
    [78]     foreground fraction of the box
    [79]     box aspect, width / (width + height)

`build_world(output_dir)` writes:

    regions/        a region store (docs/DATA.md), regions sorted by descending score
    captions/       DatasetDict: image_id, text (2-3 per image). Captions double as the image-text
                    retrieval pairs: an image's captions are its positives, every other image's
                    captions are negatives.
    vqa/            image_id, question, answers (the one answer, as given by all VQA_ANNOTATORS annotators),
                    question_type (colour, shape, count, existence, relation; up to VQA_PER_TYPE per image)
    ve/             image_id, hypothesis, label (0 entailment, 1 neutral, 2 contradiction; up to VE_PER_IMAGE)
    rec/            image_id, expression, target_box (ground truth, normalised x1, y1, x2, y2, not jittered),
                    target_index (row of the target in the image's stored regions)
    nlvr2/          left_image_id, right_image_id, sentence, label (0 false, 1 true; up to NLVR2_PER_PAIR)
    world.json      generator arguments, version, family size, VQA answer vocabulary, answers per question type, counts

The texts need the image (version 3). A `TextBalancer` per split keeps a question, hypothesis or sentence
only while it has had each of its possible labels equally often (within one), and each template's and
task's or question type's labels within two of each other, so no reader of the text alone beats chance
(`benchmarks/floors.py` measures it); balancing within each split keeps a held-out label from being the
one its text had least often in training. VE's three labels share its templates ("the small ball is red.",
"the red ball is small."): entailment when every object the description fits has the stated colour or size,
contradiction when none has, neutral when some have (version 5). REC refers only to objects that share their
shape with another, always naming the shape, so the detector's tag narrows the choice but colour, size or a
relation must decide.

Images come in families (version 4): image 2k is a random scene, image 2k+1 its `contrast_twin`, which has
the same number of objects and the same set of shapes (and, with two objects or more, the same colours and
sizes) bound differently: swapped colours, sizes, places, or one shape's count moved to another. Captions
are chosen false of the twin where one can be, so the twin is an ITM negative and a retrieval distractor
that no rule reading region count and tags rejects (`training/data/pretraining.py`, `MatchingPairs`).

The task tables are in the canonical layout the real-format readers produce (training/data/downstream.py),
so fine-tuning reads them as it reads real data; `question_type` and `target_index` are extra columns,
the ground truth the tests check the world against (training finds REC's target region by overlap, as
for real data).

Every task is split train/validation/test by family: an image, its twin and all their texts sit in one
split, and NLVR2 pairs two images of the same split. Each image draws from its own generators, seeded by
(seed, family or image index, stream), so a build is deterministic and the scene of image i does not
depend on `num_images`.
"""

import argparse
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, ImageDraw

from cmal.processors.anchor_lexicon import AnchorLexicon, pluralize

from .labels import NLVR2_LABELS, VE_LABELS
from .region_store import RegionStoreWriter, load_region_store


VERSION = 5  # 2: task tables in the canonical layout (VQA `answers`); 3: texts that need the image;
# 4: contrast twins (ITM negatives and retrieval distractors that rules cannot reject), labels balanced per split
# 5: VE states a colour or a size of what a description fits (no relations: a model of the study's size did not
# learn them in its budget), all / some / none of it
FEATURE_FUNCTION = "region_features v1"
IMAGE_SIZE = 128
MAX_OBJECTS = 6

SHAPES = ("sphere", "cube", "cylinder", "cone", "star", "ring")
SHAPE_SYNONYMS = {
    "sphere": ["ball", "orb"],
    "cube": ["box", "block"],
    "cylinder": ["tube", "drum"],
    "cone": ["pyramid"],  # drawn as a triangle, which is also a pyramid's silhouette
    "star": [],
    "ring": ["hoop"],
}
CONCEPT_NAMES = list(SHAPES)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
# Every colour differs from mid grey by 78 or more in some channel, far beyond FOREGROUND_THRESHOLD + NOISE,
# so the foreground mask is exact.
BACKGROUND = (128, 128, 128)
NOISE = 6  # +-NOISE per channel on every pixel: pixels are never exactly the palette
FOREGROUND_THRESHOLD = 30
SIZES = {"small": (14, 22), "large": (28, 40)}  # side of the object's box in pixels, inclusive range

MAX_OVERLAP = 0.2  # at most this fraction of the smaller of two boxes may be shared: objects stay visible
RELATION_MARGIN = 8  # centres must differ by more than this many pixels for "left of", "above"...
RELATIONS = {"left": ["left of", "to the left of"], "right": ["right of", "to the right of"],
             "above": ["above"], "below": ["below"]}  # fmt: skip
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Up to the most of one shape in two images (NLVR2 totals), plus the off-by-one of a false count.
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen"]  # fmt: skip

GRID = 8
FEATURE_DIM = GRID * GRID + 3 + 3 + 8 + 2
VQA_ANNOTATORS = 10  # a synthetic answer counts as given by every annotator of a real VQA v2 question
# Every VQA answer is one of these: the answer vocabulary of a classifier head.
# The answers a question of each type can have; every question text gets each of its options equally often.
QUESTION_OPTIONS = {"colour": list(COLOURS), "shape": list(SHAPES), "count": ["0", "1", "2", "3"],
                    "existence": ["no", "yes"], "relation": list(SHAPES)}  # fmt: skip
# Texts kept per image (per question type for VQA; per image pair for NLVR2).
VQA_PER_TYPE, VE_PER_IMAGE, NLVR2_PER_PAIR = 2, 3, 2
ANSWER_VOCABULARY = ["no", "yes", *[str(n) for n in range(MAX_OBJECTS + 1)], *COLOURS, *SHAPES]
SPLIT_NAMES = ("train", "validation", "test")
TABLES = ("captions", "vqa", "ve", "rec", "nlvr2")
TABLE_FEATURES = {
    "captions": datasets.Features({"image_id": datasets.Value("string"), "text": datasets.Value("string")}),
    "vqa": datasets.Features({"image_id": datasets.Value("string"), "question": datasets.Value("string"),
                              "answers": datasets.List(datasets.Value("string")),
                              "question_type": datasets.Value("string")}),
    "ve": datasets.Features({"image_id": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=VE_LABELS)}),
    "rec": datasets.Features({"image_id": datasets.Value("string"), "expression": datasets.Value("string"),
                              "target_box": datasets.List(datasets.Value("float32"), length=4),
                              "target_index": datasets.Value("int32")}),
    "nlvr2": datasets.Features({"left_image_id": datasets.Value("string"), "right_image_id": datasets.Value("string"),
                                "sentence": datasets.Value("string"),
                                "label": datasets.ClassLabel(names=NLVR2_LABELS)}),
}  # fmt: skip
# Independent generator streams per image, so changing one part of the generator leaves the others alone.
_SCENE, _REGIONS, _TEXTS = 0, 1, 2
FAMILY_SIZE = 2  # an image and its contrast twin (`scene_of`): ITM's negatives and retrieval's distractors


def synthetic_lexicon() -> AnchorLexicon:
    """The anchor lexicon of this world: shape names, their synonyms and plurals, nothing else."""
    return AnchorLexicon(CONCEPT_NAMES, synonyms=SHAPE_SYNONYMS, default_synonyms=False)


# ------------------------------------------------------------------------------------------------
# Scenes and rendering
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # pixels x1, y1, x2, y2; x2 and y2 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # a list is accepted and stored as a tuple: scenes are hashable
    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE
    noise_seed: int = 0  # seeds the pixel noise, so `render` is a pure function of the scene

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))


def _pick(rng, options):
    """One element of a sequence (rng.choice would turn strings into numpy strings)."""
    return options[int(rng.integers(len(options)))]


def _overlap(a, b) -> float:
    """Shared area of two boxes as a fraction of the smaller box."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def generate_scene(rng: np.random.Generator, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> Scene:
    """1-6 random objects at random places; an object that cannot be placed with little overlap is dropped."""
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        shape, colour, size = _pick(rng, SHAPES), _pick(rng, list(COLOURS)), _pick(rng, list(SIZES))
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        w, h = (round(0.6 * side), side) if shape == "cylinder" else (side, side)
        for _attempt in range(30):
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x, y, x + w, y + h)
            if all(_overlap(box, other.box) <= MAX_OVERLAP for other in objects):
                objects.append(SceneObject(shape, colour, size, box))
                break
    return Scene(objects, width, height, noise_seed=int(rng.integers(2**31)))


def _boxed(obj: SceneObject, centre, width: int, height: int, size=None, shape=None) -> SceneObject:
    """`obj` with its box centred near `centre` (shifted inside the image) and, where given, another size
    class (the side of the same rank in the other size's range) or shape (a cylinder is 0.6 as wide)."""
    size, shape = size or obj.size, shape or obj.shape
    side = obj.box[3] - obj.box[1]
    if size != obj.size:
        low, high = SIZES[obj.size]
        new_low, new_high = SIZES[size]
        side = new_low + round((side - low) / max(high - low, 1) * (new_high - new_low))
    w = round(0.6 * side) if shape == "cylinder" else side
    x = min(max(round(centre[0] - w / 2), 0), width - w)
    y = min(max(round(centre[1] - side / 2), 0), height - side)
    return SceneObject(shape, obj.colour, size, (x, y, x + w, y + side))


CONTRASTS = ("colours", "sizes", "places", "shapes")


def _contrasts(objects) -> list[tuple]:
    """Every edit that keeps the object count, the set of shapes and the bags of colours and sizes:
    (kind, i, j) swaps the colours, sizes or places of objects i and j; ("shapes", i, j) gives object i,
    whose shape another object shares, object j's shape (one shape's count moves from one to the other)."""
    n, edits = len(objects), []
    for i in range(n):
        for j in range(n):
            a, b = objects[i], objects[j]
            if i < j and a.colour != b.colour:
                edits.append(("colours", i, j))
            if i < j and a.size != b.size:
                edits.append(("sizes", i, j))
            if i < j and (a.shape, a.colour, a.size) != (b.shape, b.colour, b.size):
                edits.append(("places", i, j))
            if a.shape != b.shape and sum(o.shape == a.shape for o in objects) > 1:
                edits.append(("shapes", i, j))
    return edits


def contrast_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that a reader of the detector's tags and region count cannot tell from `scene`: the same
    number of objects and the same set of shapes, differing in what needs grounding.

    One edit of `_contrasts` (a kind drawn uniformly among the possible ones, then an edit of it) binds
    colour, size, place or shape to other objects while the image's bags of colours and sizes stay the
    same. Where no swap is possible or places well (a single object, or one that would overlap), one
    object gets another colour: then only its colour tells the two scenes apart. The twin has its own
    pixel noise.
    """
    objects, (width, height) = list(scene.objects), (scene.width, scene.height)
    edits = _contrasts(objects)
    kinds = [kind for kind in CONTRASTS if any(edit[0] == kind for edit in edits)]
    for kind in [kinds[k] for k in rng.permutation(len(kinds))]:
        options = [edit for edit in edits if edit[0] == kind]
        for _, i, j in [options[k] for k in rng.permutation(len(options))]:
            a, b = objects[i], objects[j]
            edited = list(objects)
            if kind == "colours":
                edited[i], edited[j] = (SceneObject(o.shape, c, o.size, o.box) for o, c in ((a, b.colour), (b, a.colour)))
            elif kind == "sizes":
                edited[i], edited[j] = _boxed(a, a.centre, width, height, size=b.size), _boxed(b, b.centre, width, height, size=a.size)
            elif kind == "places":
                edited[i], edited[j] = _boxed(a, b.centre, width, height), _boxed(b, a.centre, width, height)
            else:
                edited[i] = _boxed(a, a.centre, width, height, shape=b.shape)
            if all(_overlap(edited[k].box, edited[m].box) <= MAX_OVERLAP for k in range(len(edited)) for m in range(k)):
                return Scene(edited, width, height, noise_seed=int(rng.integers(2**31)))
    k = int(rng.integers(len(objects)))
    objects[k] = SceneObject(objects[k].shape, _pick(rng, [c for c in COLOURS if c != objects[k].colour]), objects[k].size, objects[k].box)
    return Scene(objects, width, height, noise_seed=int(rng.integers(2**31)))


def scene_of(seed: int, index: int) -> Scene:
    """The scene of image `index` of a world built with `seed`: images come in families of `FAMILY_SIZE`, the
    first a random scene (`generate_scene`), each other one its `contrast_twin`. Independent of the world's size."""
    family, member = divmod(index, FAMILY_SIZE)
    scene = generate_scene(np.random.default_rng([seed, family, _SCENE]))
    return scene if member == 0 else contrast_twin(scene, np.random.default_rng([seed, family, _SCENE, member]))


def family_members(index: int, num_images: int) -> list[int]:
    """The other images of image `index`'s family (its contrast twins) among `num_images` images."""
    start = index - index % FAMILY_SIZE
    return [k for k in range(start, min(start + FAMILY_SIZE, num_images)) if k != index]


# Unit star: 5 outer points, inner radius 0.4, point up; scaled to fill the object's box.
_angles = -np.pi / 2 + np.arange(10) * np.pi / 5
_star = np.stack([np.cos(_angles), np.sin(_angles)], 1) * np.where(np.arange(10) % 2, 0.4, 1.0)[:, None]
STAR_POINTS = (_star - _star.min(0)) / (_star.max(0) - _star.min(0))


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x1, y1, x2, y2 = obj.box
    r, b = x2 - 1, y2 - 1  # PIL's boxes include their last pixel
    fill = COLOURS[obj.colour]
    if obj.shape == "sphere":
        draw.ellipse([x1, y1, r, b], fill=fill)
    elif obj.shape == "cube":
        draw.rectangle([x1, y1, r, b], fill=fill)
    elif obj.shape == "cylinder":  # a body with elliptical top and bottom
        cap = max(2, round(0.35 * (x2 - x1)))
        draw.rectangle([x1, y1 + cap // 2, r, b - cap // 2], fill=fill)
        draw.ellipse([x1, y1, r, y1 + cap], fill=fill)
        draw.ellipse([x1, b - cap, r, b], fill=fill)
    elif obj.shape == "cone":
        draw.polygon([(x1, b), (r, b), ((x1 + r) / 2, y1)], fill=fill)
    elif obj.shape == "star":
        points = STAR_POINTS * [r - x1, b - y1] + [x1, y1]
        draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse([x1, y1, r, b], outline=fill, width=max(2, round(0.28 * (x2 - x1))))
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """The scene's RGB image: objects in list order (later ones on top), then pixel noise from `noise_seed`."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj)
    pixels = np.asarray(image, dtype=np.int16)
    noise = np.random.default_rng(scene.noise_seed).integers(-NOISE, NOISE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# Region features, from pixels
# ------------------------------------------------------------------------------------------------


def _pixel_maps(pixels: np.ndarray):
    """Pixels, foreground mask and hue bin per pixel (-1 = achromatic or background), computed once per image."""
    pixels = np.asarray(pixels)[..., :3]
    distance = np.abs(pixels.astype(np.int16) - np.array(BACKGROUND, np.int16))
    foreground = (
        (distance[..., 0] > FOREGROUND_THRESHOLD)
        | (distance[..., 1] > FOREGROUND_THRESHOLD)
        | (distance[..., 2] > FOREGROUND_THRESHOLD)
    )
    rgb = pixels[foreground].astype(np.float32)  # hue only where it is used: the foreground
    red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    high, low = np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(high == red, ((green - blue) / safe) % 6,
                   np.where(high == green, (blue - red) / safe + 2, (red - green) / safe + 4)) * 60  # fmt: skip
    bins = (((hue + 22.5) % 360) // 45).astype(np.int8)
    bins[chroma <= 0.2 * 255] = -1  # grey, white and black have no meaningful hue
    hue_bin = np.full(foreground.shape, -1, np.int8)
    hue_bin[foreground] = bins
    return pixels, foreground, hue_bin


_CELL_EDGES = np.arange(GRID + 1)


def _occupancy(mask: np.ndarray) -> np.ndarray:
    """Foreground fraction of each cell of a GRID x GRID split of the mask; row r falls in cell r * GRID // h."""
    h, w = mask.shape
    if h >= GRID and w >= GRID:  # every cell has pixels: sum the cells in two strided reductions
        rows, cols = (_CELL_EDGES * h + GRID - 1) // GRID, (_CELL_EDGES * w + GRID - 1) // GRID  # ends at h, w
        counts = np.add.reduceat(np.add.reduceat(mask.astype(np.int32), rows[:-1], 0), cols[:-1], 1)
        sizes = (rows[1:] - rows[:-1])[:, None] * (cols[1:] - cols[:-1])[None, :]
        return (counts / sizes).ravel()
    cells = ((np.arange(h) * GRID) // h)[:, None] * GRID + ((np.arange(w) * GRID) // w)[None, :]
    sizes = np.bincount(cells.ravel(), minlength=GRID * GRID)
    counts = np.bincount(cells.ravel(), weights=mask.ravel(), minlength=GRID * GRID)
    return counts / np.maximum(sizes, 1)  # a box under GRID pixels wide leaves cells empty: 0


def _box_features(maps, box) -> np.ndarray:
    pixels, foreground, hue_bin = maps
    height, width = foreground.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    ix1, iy1 = min(max(math.floor(x1), 0), width - 1), min(max(math.floor(y1), 0), height - 1)
    ix2, iy2 = max(min(math.ceil(x2), width), ix1 + 1), max(min(math.ceil(y2), height), iy1 + 1)
    mask = foreground[iy1:iy2, ix1:ix2]
    count = int(np.count_nonzero(mask))
    features = np.zeros(FEATURE_DIM, np.float64)
    features[: GRID * GRID] = _occupancy(mask)
    if count:
        colours = pixels[iy1:iy2, ix1:ix2][mask].astype(np.float64) / 255
        mean = colours.sum(0) / count
        features[64:67] = mean
        features[67:70] = np.sqrt(np.maximum((colours * colours).sum(0) / count - mean * mean, 0))
        bins = hue_bin[iy1:iy2, ix1:ix2][mask].astype(np.int64) + 1  # 0 = no hue
        features[70:78] = np.bincount(bins, minlength=9)[1:] / count
    box_w, box_h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    features[78:80] = count / mask.size, box_w / (box_w + box_h)
    return features.astype(np.float32)


def region_features(pixels: np.ndarray, box) -> np.ndarray:
    """The FEATURE_DIM feature vector of the pixel box (x1, y1, x2, y2) of an [H, W, 3] uint8 image.

    A fixed function of the pixels (layout in the module docstring), so a model has to learn from
    what is visible: a jittered box sees part of its object, a distractor box mostly background.
    """
    return _box_features(_pixel_maps(pixels), box)


def _jitter(box, fraction, rng, width, height) -> np.ndarray:
    """Each coordinate moved by up to `fraction` of the box's width (x) or height (y), kept in the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    moved = np.array(box, np.float64) + rng.uniform(-fraction, fraction, 4) * [w, h, w, h]
    moved = np.clip(moved, 0, [width, height, width, height])
    moved[2], moved[3] = max(moved[2], moved[0] + 2), max(moved[3], moved[1] + 2)
    moved[0], moved[1] = min(moved[0], width - 2), min(moved[1], height - 2)
    return np.clip(moved, 0, [width, height, width, height])


def scene_regions(scene: Scene, pixels: np.ndarray, rng, box_jitter=0.1, num_distractors=2, tag_noise=0.1):
    """What a detector would return for the scene: (region store row without image_id, stored index per object).

    One region per object (jittered box, tag replaced by another shape with probability
    `tag_noise`, score ~ U(0.7, 1)) plus `num_distractors` random boxes (tag -1 or a random shape,
    score ~ U(0.05, 0.5)), sorted by descending score as a detector's output would be.
    """
    width, height = scene.width, scene.height
    boxes, concept_ids, scores = [], [], []
    for obj in scene.objects:
        boxes.append(_jitter(obj.box, box_jitter, rng, width, height))
        concept = SHAPES.index(obj.shape)
        if rng.random() < tag_noise:
            concept = _pick(rng, [c for c in range(len(SHAPES)) if c != concept])
        concept_ids.append(concept)
        scores.append(rng.uniform(0.7, 1.0))
    for _ in range(num_distractors):
        w, h = rng.integers(8, 49, 2)
        x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        boxes.append(np.array([x, y, x + w, y + h], np.float64))
        concept_ids.append(-1 if rng.random() < 0.5 else int(rng.integers(len(SHAPES))))
        scores.append(rng.uniform(0.05, 0.5))

    order = np.argsort(-np.array(scores), kind="stable")
    maps = _pixel_maps(pixels)
    boxes = np.array(boxes, np.float64).reshape(-1, 4)[order]
    features = np.stack([_box_features(maps, box) for box in boxes]) if len(boxes) else np.zeros((0, FEATURE_DIM))
    stored_index = np.argsort(order)  # object k (region k before sorting) lands at row stored_index[k]
    row = {
        "image_width": width,
        "image_height": height,
        "features": features.astype(np.float16),
        "boxes": (boxes / [width, height, width, height]).astype(np.float32),
        "concept_ids": np.array(concept_ids, np.int32)[order],
        "scores": np.array(scores, np.float32)[order],
    }
    return row, [int(i) for i in stored_index[: len(scene.objects)]]


# ------------------------------------------------------------------------------------------------
# Language: descriptions, relations and the per-scene text generators
# ------------------------------------------------------------------------------------------------

# Attribute sets a description can use, in the order they are written ("small red ball").
ATTRIBUTE_SETS = [("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "shape"),
                  ("size", "colour"), ("size", "colour", "shape")]  # fmt: skip


def _noun(shape: str, rng, plural: bool = False) -> str:
    word = _pick(rng, [shape, *SHAPE_SYNONYMS.get(shape, [])])
    return pluralize(word) if plural else word


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _phrase(obj: SceneObject, attributes, rng, plural: bool = False) -> str:
    """'small red ball' from the chosen attributes; without the shape the noun is 'object'."""
    words = [getattr(obj, name) for name in ("size", "colour") if name in attributes]
    if "shape" in attributes:
        words.append(_noun(obj.shape, rng, plural))
    else:
        words.append("objects" if plural else "object")
    return " ".join(words)


def _matches(obj: SceneObject, attributes, reference: SceneObject) -> bool:
    return all(getattr(obj, name) == getattr(reference, name) for name in attributes)


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float = RELATION_MARGIN) -> bool:
    """Whether `a` is `relation` ("left", "right", "above", "below") of `b`, from the box centres.

    With the default margin the relation is clear to a viewer; margin 0 is "even slightly".
    """
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    return {"left": dx < -margin, "right": dx > margin, "above": dy < -margin, "below": dy > margin}[relation]


class _Facts:
    """What the text generators ask of one scene, computed once: who matches whom, which relations hold."""

    def __init__(self, scene: Scene):
        objects = self.objects = scene.objects
        n = len(objects)
        self.match = {}  # attrs -> [k][i]: object k has object i's values of attrs
        for attrs in [(), *ATTRIBUTE_SETS]:
            keys = [tuple(getattr(o, name) for name in attrs) for o in objects]
            self.match[attrs] = [[keys[k] == keys[i] for i in range(n)] for k in range(n)]
        self.unique = [[attrs for attrs in ATTRIBUTE_SETS if sum(self.match[attrs][i]) == 1] for i in range(n)]
        centres = [o.centre for o in objects]
        # The tests of relation_holds, on all pairs: [i][j] is whether object i is rel of object j.
        offsets = {"left": lambda a, b: b[0] - a[0], "right": lambda a, b: a[0] - b[0],
                   "above": lambda a, b: b[1] - a[1], "below": lambda a, b: a[1] - b[1]}  # fmt: skip
        self.holds = {r: [[f(a, b) > RELATION_MARGIN for b in centres] for a in centres] for r, f in offsets.items()}
        self.loose = {r: [[f(a, b) > 0 for b in centres] for a in centres] for r, f in offsets.items()}
        self.pairs = [(i, j, rel) for rel in RELATIONS for i in range(n) for j in range(n) if self.holds[rel][i][j]]

    def unique_without(self, index: int, exclude=()) -> list[tuple]:
        return [attrs for attrs in self.unique[index] if not set(attrs) & set(exclude)]

    def only_one(self, index: int, anchor: int, relation: str, attributes=()) -> bool:
        """Object `index` is clearly `relation` of `anchor`, and no other object matching it on
        `attributes` is even slightly so: "the <attributes> <relation> the <anchor>" is unambiguous."""
        if not self.holds[relation][index][anchor]:
            return False
        same, loose = self.match[attributes], self.loose[relation]
        return all(k == index for k in range(len(self.objects)) if k != anchor and same[k][index] and loose[k][anchor])


@functools.lru_cache(maxsize=16)
def _facts(scene: Scene) -> _Facts:
    """The facts of a scene, shared by its caption, VQA, VE and REC generators."""
    return _Facts(scene)


def unique_descriptions(scene: Scene, index: int, exclude=()) -> list[tuple]:
    """Attribute sets (not using `exclude`) that single out object `index` in the scene."""
    return _facts(scene).unique_without(index, exclude)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _count_phrase(count: int, shape: str, rng, suffix: str = "") -> str:
    """'there are exactly two boxes', 'there is exactly one ball', 'there are no stars'."""
    if count == 0:
        return f"there are no {_noun(shape, rng, plural=True)}{suffix}"
    if count == 1:
        return f"there is exactly one {_noun(shape, rng)}{suffix}"
    return f"there are exactly {NUMBER_WORDS[count]} {_noun(shape, rng, plural=True)}{suffix}"


def captions_for(scene: Scene, rng, contrast: Scene | None = None) -> list[str]:
    """2-3 true captions: listings of the objects, relations between two of them, object counts.

    With a `contrast` scene (the image's twin), captions false of it come first: a caption then tells its
    image from the twin, so the twin is a negative that needs grounding (`caption_holds`)."""
    facts = _facts(scene)
    groups: dict[tuple, list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    keys = list(groups)
    keys = [keys[i] for i in rng.permutation(len(keys))]

    def listing(template: int) -> str:
        parts = []
        for colour, shape in keys:
            members = groups[(colour, shape)]
            if len(members) == 1:
                attributes = _pick(rng, [("colour", "shape"), ("size", "colour", "shape")])
                parts.append(_a(_phrase(members[0], attributes, rng)))
            else:
                parts.append(f"{NUMBER_WORDS[len(members)]} {colour} {_noun(shape, rng, plural=True)}")
        text = _join(parts)
        verb = "is" if len(groups[keys[0]]) == 1 else "are"
        templates = [f"{text}.", f"an image with {text}.", f"there {verb} {text}.", f"{text} on a grey background."]
        return templates[template]

    def relation(i, j, rel) -> str:
        with_shape = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")]
        first, second = (_a(_phrase(scene.objects[k], _pick(rng, with_shape), rng)) for k in (i, j))
        return f"{first} {_pick(rng, ['', 'is '])}{_pick(rng, RELATIONS[rel])} {second}."

    def count(obj) -> str:
        example = _a(_phrase(obj, ("colour", "shape"), rng))
        if len(scene.objects) == 1:
            return f"a scene with a single object: {example}."
        return f"a scene with {NUMBER_WORDS[len(scene.objects)]} objects, among them {example}."

    wanted = int(rng.integers(2, 4))
    if contrast is None:
        captions = [listing(int(rng.integers(4)))]
        makers = [lambda: relation(*_pick(rng, facts.pairs)) if facts.pairs else None,
                  lambda: count(_pick(rng, scene.objects)), lambda: listing(int(rng.integers(4)))]  # fmt: skip
        for k in rng.permutation(len(makers)):
            if len(captions) == wanted:
                break
            caption = makers[k]()
            if caption is not None and caption not in captions:
                captions.append(caption)
        return captions
    kinds = [[listing(int(rng.integers(4))) for _ in range(4)], [relation(*pair) for pair in facts.pairs],
             [count(obj) for obj in scene.objects]]  # fmt: skip
    ranked = []  # kinds in turn (a random order), telling captions before the others
    for telling in (True, False):
        of_kind = [[c for c in kind if caption_holds(c, contrast) != telling] for kind in kinds]
        of_kind = [[kind[k] for k in rng.permutation(len(kind))] for kind in of_kind]
        order = rng.permutation(len(kinds))
        ranked += [kind[n] for n in range(max(map(len, of_kind))) for kind in (of_kind[k] for k in order) if n < len(kind)]
    return list(dict.fromkeys(ranked))[:wanted]


_NUMBER = {word: n for n, word in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1}
# A regular expression matching any relation phrase (longest first), and the relation each phrase names.
RELATION_PATTERN = "|".join(sorted((p for phrases in RELATIONS.values() for p in phrases), key=len, reverse=True))
RELATION_OF = {phrase: name for name, phrases in RELATIONS.items() for phrase in phrases}


@functools.cache
def _lexicon() -> AnchorLexicon:
    return synthetic_lexicon()


def described(objects, phrase: str) -> list:
    """The objects (anything with `size`, `colour` and `shape`) that fit every size, colour and shape word of
    `phrase` ("small red ball"); other words ("the", "objects") are ignored."""
    found = list(objects)
    for word in re.findall(r"[a-z]+", phrase):
        if named := _names(word):
            attribute, value = named
            found = [o for o in found if getattr(o, attribute) == value]
    return found


@functools.cache
def _names(word: str) -> tuple[str, str] | None:
    """The attribute a word names and its value: ("size", "small"), ("colour", "red"), ("shape", "sphere") for
    any of the sphere's names in the lexicon; None for other words. Kept per word: building a world asks about a
    few dozen words millions of times."""
    if word in SIZES or word in COLOURS:
        return ("size" if word in SIZES else "colour"), word
    concept = _lexicon().concept_of(word)
    return ("shape", SHAPES[concept]) if concept >= 0 else None


def caption_holds(caption: str, scene: Scene) -> bool:
    """Whether a caption of `captions_for` could be said of `scene`, read generously: a listing holds when
    every group it names is there (in that number), a relation when it holds even slightly, a count when
    the number of objects and the example match. Keeps an ITM negative from being a true pair."""
    text = caption.removesuffix(".").removesuffix(" on a grey background")
    if m := re.fullmatch(r"a scene with (?:a single object|(\w+) objects, among them):? an? (.+)", text):
        return len(scene.objects) == _NUMBER.get(m[1] or "one", -1) and bool(described(scene.objects, m[2]))
    if m := re.fullmatch(rf"an? (.+?) (?:is )?({RELATION_PATTERN}) an? (.+)", text):
        relation = RELATION_OF[m[2]]
        return any(a is not b and relation_holds(a, b, relation, margin=0)
                   for a in described(scene.objects, m[1]) for b in described(scene.objects, m[3]))  # fmt: skip
    text = re.sub(r"^(an image with |there (?:is|are) )", "", text)
    for part in re.split(r", | and ", text):
        number, _, phrase = part.partition(" ")
        found = described(scene.objects, phrase)
        if not found if number in ("a", "an") else len(found) != _NUMBER.get(number, -1):
            return False
    return True


def world_scenes(world: dict) -> list[Scene]:
    """The scene of every image of a loaded world, in region-store order, regenerated from its seed."""
    seed = world["world"]["arguments"]["seed"]
    return [scene_of(seed, i) for i in range(world["world"]["arguments"]["num_images"])]


def twin_rows(image_ids) -> Callable[[int], list[int]]:
    """`twins(row)`: the rows of the contrast twins of the image in row `row` of a region store that holds a
    world's images (found by their ids, so a store in another order, or without some of them, works too)."""
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    twins = []
    for image_id in image_ids:
        ids = (f"synthetic-{k:06d}" for k in family_members(int(image_id.rsplit("-", 1)[1]), math.inf))
        twins.append([row_of[other] for other in ids if other in row_of])
    return twins.__getitem__


def caption_truth(world: dict):
    """`true_of(text, image_row)`: whether a caption holds of the image in that row of the world's region store."""
    scenes = world_scenes(world)
    return lambda text, row: caption_holds(text, scenes[row])


def vqa_for(scene: Scene, rng) -> list[dict]:
    """Candidate questions with exactly one correct answer (question, answer, question_type), every answer
    one of `QUESTION_OPTIONS[question_type]`; the world keeps those a `TextBalancer` accepts.

    A question names an object only by a description that fits it alone, so "what colour is the
    ball?" is asked only when there is one ball. Counts are asked of every shape and colour whose
    count is an option (0-3), existence of every shape and of coloured shapes, half of them present.
    """
    facts = _facts(scene)
    objects = scene.objects
    items = []

    def add(question, answer, kind):
        if question not in [item["question"] for item in items]:
            items.append({"question": question, "answer": answer, "question_type": kind})

    for i, obj in enumerate(objects):
        # colour: a description without colour that names one object; shape: one without shape
        for kind, exclude in (("colour", ("colour",)), ("shape", ("shape",))):
            options = facts.unique_without(i, exclude)
            if options:
                add(f"what {kind} is the {_phrase(obj, _pick(rng, options), rng)}?", getattr(obj, kind), kind)
    for shape in SHAPES:
        n = sum(o.shape == shape for o in objects)
        if str(n) in QUESTION_OPTIONS["count"]:
            add(f"how many {_noun(shape, rng, plural=True)} are there?", str(n), "count")
        noun = _noun(shape, rng)
        add(f"is there {_a(noun)}?", "yes" if n else "no", "existence")
    for colour in COLOURS:
        n = sum(o.colour == colour for o in objects)
        if str(n) in QUESTION_OPTIONS["count"]:
            add(f"how many {colour} objects are there?", str(n), "count")
    present = list(dict.fromkeys((o.colour, o.shape) for o in objects))  # in object order: a set's order varies by process
    absent = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in present]
    for colour, shape in [*present, *(_pick(rng, absent) for _ in range(len(present)))]:
        add(f"is there {_a(f'{colour} {_noun(shape, rng)}')}?", "yes" if (colour, shape) in present else "no", "existence")
    # relation: "what is left of the red ball?" when exactly one object is
    for i, j, rel in facts.pairs:
        if facts.unique[j] and facts.only_one(i, j, rel):
            anchor = _phrase(objects[j], _pick(rng, facts.unique[j]), rng)
            add(f"what is {_pick(rng, RELATIONS[rel])} the {anchor}?", objects[i].shape, "relation")
    return [items[k] for k in rng.permutation(len(items))]


def ve_for(scene: Scene, rng) -> list[dict]:
    """Candidate hypotheses stating a colour or a size of what a description fits, in all three labels: "the
    small ball is red." is entailment when every object the description fits is red, contradiction when none
    is, neutral when some are and some are not (which one is meant cannot be told).

    A colour is stated of a description by shape and/or size, a size of one by shape and/or colour; half the
    time the stated value is one a fitting object has, else any. Each label is a check of the regions a
    description fits, which the world's question types already ask one at a time (existence, colour). Relations
    are left to VQA and REC: as VE's hypotheses (v4) a model of the study's size did not learn them in the study's
    budget, nor does it learn VQA's relation questions yet; REC's it does (`benchmarks/learnability.py`).
    """
    facts = _facts(scene)
    objects = scene.objects
    items = {}
    for stated, options, descriptions in (("colour", list(COLOURS), [("shape",), ("size",), ("size", "shape")]),
                                          ("size", list(SIZES), [("shape",), ("colour",), ("colour", "shape")])):  # fmt: skip
        for i, obj in enumerate(objects):
            for attrs in descriptions:
                fitting = [objects[k] for k in range(len(objects)) if facts.match[attrs][k][i]]
                value = getattr(_pick(rng, fitting), stated) if rng.random() < 0.5 else _pick(rng, options)
                has = [getattr(o, stated) == value for o in fitting]
                label = 0 if all(has) else 2 if not any(has) else 1
                hypothesis = f"the {_phrase(obj, attrs, rng)} is {value}."
                items.setdefault(hypothesis, {"hypothesis": hypothesis, "label": label})
    items = list(items.values())
    return [items[k] for k in rng.permutation(len(items))]


def rec_for(scene: Scene, rng, max_expressions: int = 3) -> list[dict]:
    """Referring expressions that pick out exactly one object among others of its shape: {"expression", "object_index"}.

    Only objects that share their shape with another one are referred to, and always by a description
    with the shape noun, so the region's detected tag narrows the choice to two or more regions and
    colour, size or a relation ("the ball left of the blue box") must do the rest.
    """
    facts = _facts(scene)
    objects = scene.objects
    with_shape = [attrs for attrs in ATTRIBUTE_SETS if "shape" in attrs]
    items = []
    twins = [t for t in range(len(objects)) if sum(facts.match[("shape",)][t]) > 1]
    for t in rng.permutation(twins)[:max_expressions]:
        t = int(t)
        described = [attrs for attrs in facts.unique[t] if "shape" in attrs]
        relational = [(a, rel, attrs) for a in range(len(objects)) if a != t and facts.unique[a]
                      for rel in RELATIONS if facts.holds[rel][t][a]
                      for attrs in with_shape if facts.only_one(t, a, rel, attrs)]  # fmt: skip
        if relational and (not described or rng.random() < 0.5):
            a, rel, attrs = _pick(rng, relational)
            anchor = _phrase(objects[a], _pick(rng, facts.unique[a]), rng)
            expression = f"the {_phrase(objects[t], attrs, rng)} {_pick(rng, RELATIONS[rel])} the {anchor}"
        elif described:
            expression = f"the {_phrase(objects[t], _pick(rng, described), rng)}"
        else:
            continue
        items.append({"expression": expression, "object_index": t})
    return items


def nlvr2_for(left: Scene, right: Scene, rng) -> list[tuple[str, bool]]:
    """Candidate statements about two images, each with whether it is true; the world keeps those a
    `TextBalancer` accepts."""
    scenes = {"left": left, "right": right}
    both = left.objects + right.objects
    candidates = []
    for side in scenes:
        obj = _pick(rng, both)
        colour, shape = (obj.colour, obj.shape) if rng.random() < 0.5 else (_pick(rng, list(COLOURS)), _pick(rng, SHAPES))
        truth = any(o.colour == colour and o.shape == shape for o in scenes[side].objects)
        candidates.append((f"the {side} image contains {_a(colour + ' ' + _noun(shape, rng))}.", truth))
    for shape in SHAPES:
        total = sum(o.shape == shape for o in both)
        n = _pick(rng, [m for m in (total - 1, total, total + 1) if m >= 0])
        candidates.append((_count_phrase(n, shape, rng, " in total") + ".", n == total))
        has = [any(o.shape == shape for o in s.objects) for s in (left, right)]
        noun = _a(_noun(shape, rng))
        candidates.append((f"both images contain {noun}.", all(has)))
        candidates.append((f"exactly one image contains {noun}.", sum(has) == 1))
        candidates.append((f"neither image contains {noun}.", not any(has)))
    candidates.append(
        ("the left image has more objects than the right image.", len(left.objects) > len(right.objects))
    )
    for side in scenes:
        count = max(len(scenes[side].objects) + int(rng.integers(-1, 2)), 1)
        plural = "" if count == 1 else "s"
        candidates.append((f"the {side} image contains exactly {NUMBER_WORDS[count]} object{plural}.",
                           count == len(scenes[side].objects)))  # fmt: skip
    return [candidates[k] for k in rng.permutation(len(candidates))]


def text_template(text: str) -> str:
    """A text with its shape, colour and size words replaced by their kind: "the <size> <shape> is <colour>."."""
    words = []
    for word in re.findall(r"[a-z0-9]+|[^a-z0-9 ]", text):
        named = _names(word)
        words.append(f"<{named[0]}>" if named else word)
    return " ".join(words)


class TextBalancer:
    """Keeps labels balanced per text, per template and per group of texts, so that the text alone tells nothing
    about its label.

    A text (a question, a hypothesis, a sentence) is accepted with a label only when that label is one of
    the least used ones for that exact text so far, among all its possible labels, and is used no more than
    `slack` times above the least used label of its template (`text_template`) and of its group (a task, a
    question type). Every text then carries each possible label equally often, within one, whatever the
    world's size, and so does each template and group within `slack`: a text seen once carries the label its
    scene gave, and the template's balance keeps those from teaching a reader of the words (a bag of words,
    character n-grams) which label a kind of sentence tends to have. Texts whose labels are skewed by the
    scenes (most counts are small) are kept less often; the build offers many candidates. The world keeps one
    balancer per split: balanced over all splits together, a text's held-out label was the one it had least
    often in training.
    """

    def __init__(self, slack: int = 2):
        self.slack = slack
        self.counts: dict[str, dict] = {}

    def accept(self, text: str, label, options, group: str) -> bool:
        keys = [("text", text), ("template", group, text_template(text)), ("group", group)]
        counts = [self.counts.setdefault(key, dict.fromkeys(options, 0)) for key in keys]
        if counts[0][label] > min(counts[0].values()) or any(c[label] >= min(c.values()) + self.slack for c in counts[1:]):
            return False
        for c in counts:
            c[label] += 1
        return True


# ------------------------------------------------------------------------------------------------
# Building, loading and caching a world
# ------------------------------------------------------------------------------------------------


def _kept(candidates: list, limit: int, accept) -> list:
    """The first `limit` candidates that `accept` takes, offering no more once the limit is reached."""
    kept = []
    for candidate in candidates:
        if len(kept) == limit:
            break
        if accept(candidate):
            kept.append(candidate)
    return kept


def _split_sizes(num_images: int, splits) -> list[int]:
    splits = [float(s) for s in splits]
    if len(splits) != 3 or min(splits) < 0 or not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"`splits` must be three non-negative fractions (train, validation, test) summing to 1, got {splits}"
        )
    train, validation = round(splits[0] * num_images), round(splits[1] * num_images)
    validation = min(validation, num_images - train)
    return [train, validation, num_images - train - validation]


def _write_world(path, num_images, seed, box_jitter, num_distractors, tag_noise, splits) -> dict:
    num_families = -(-num_images // FAMILY_SIZE)
    order = np.random.default_rng([seed, 10**6]).permutation(num_families)  # streams past any image index
    split_of_family = np.empty(num_families, np.int64)
    split_of_family[order] = np.repeat(np.arange(3), _split_sizes(num_families, splits))
    split_of = split_of_family[np.arange(num_images) // FAMILY_SIZE]  # a family stays in one split
    sizes = np.bincount(split_of, minlength=3).tolist()
    image_ids = [f"synthetic-{i:06d}" for i in range(num_images)]
    rows = {table: [[] for _ in SPLIT_NAMES] for table in TABLES}
    scenes, num_regions = [scene_of(seed, i) for i in range(num_images)], 0
    # One per split: a text's labels are balanced within its split, so its held-out label cannot be read off
    # its training labels (balanced over all splits together, the held-out label was the one seen least).
    balancers = [TextBalancer() for _ in SPLIT_NAMES]

    detector = {"name": "synthetic-world", "version": VERSION, "feature_function": FEATURE_FUNCTION,
                "box_jitter": box_jitter, "num_distractors": num_distractors, "tag_noise": tag_noise}  # fmt: skip
    with RegionStoreWriter(os.path.join(path, "regions"), FEATURE_DIM, CONCEPT_NAMES, source="synthetic",
                           detector=detector, shard_size=1000) as writer:  # fmt: skip
        for i, image_id in enumerate(image_ids):
            scene = scenes[i]
            row, stored = scene_regions(scene, np.asarray(render(scene)), np.random.default_rng([seed, i, _REGIONS]),
                                        box_jitter, num_distractors, tag_noise)  # fmt: skip
            writer.add({"image_id": image_id, **row})
            num_regions += len(row["scores"])

            rng = np.random.default_rng([seed, i, _TEXTS])
            split = split_of[i]
            balancer = balancers[split]
            rows_of = {table: rows[table][split] for table in TABLES}
            twins = family_members(i, num_images)
            captions = captions_for(scene, rng, scenes[twins[0]] if twins else None)
            rows_of["captions"] += [{"image_id": image_id, "text": text} for text in captions]
            questions = vqa_for(scene, rng)
            for kind, options in QUESTION_OPTIONS.items():
                of_kind = [item for item in questions if item["question_type"] == kind]
                for item in _kept(of_kind, VQA_PER_TYPE, lambda item: balancer.accept(item["question"], item["answer"], options, kind)):
                    rows_of["vqa"].append({"image_id": image_id, "question": item["question"], "question_type": kind,
                                           "answers": [item["answer"]] * VQA_ANNOTATORS})  # fmt: skip
            ve = rows_of["ve"]
            for item in _kept(ve_for(scene, rng), VE_PER_IMAGE, lambda item: balancer.accept(item["hypothesis"], item["label"], range(3), "ve")):
                ve.append({"image_id": image_id, **item})
            w, h = scene.width, scene.height
            for item in rec_for(scene, rng):
                x1, y1, x2, y2 = scene.objects[item["object_index"]].box
                rows_of["rec"].append({"image_id": image_id, "expression": item["expression"],
                                       "target_box": [x1 / w, y1 / h, x2 / w, y2 / h],
                                       "target_index": stored[item["object_index"]]})  # fmt: skip

    for split in range(3):
        members = np.flatnonzero(split_of == split)
        if len(members) < 2:
            continue
        rng = np.random.default_rng([seed, 10**6 + 1, split])
        members = members[rng.permutation(len(members))]
        for k, left in enumerate(members):
            right = members[(k + 1) % len(members)]
            statements = _kept(nlvr2_for(scenes[left], scenes[right], rng), NLVR2_PER_PAIR,
                               lambda statement: balancers[split].accept(*statement, (False, True), "nlvr2"))  # fmt: skip
            rows["nlvr2"][split] += [{"left_image_id": image_ids[left], "right_image_id": image_ids[right],
                                      "sentence": text, "label": int(truth)} for text, truth in statements]  # fmt: skip

    counts = {"images": dict(zip(SPLIT_NAMES, sizes)), "regions": num_regions}
    for table in TABLES:
        splits_dict = datasets.DatasetDict({
            name: datasets.Dataset.from_dict(
                {column: [row[column] for row in rows[table][k]] for column in TABLE_FEATURES[table]},
                features=TABLE_FEATURES[table],
            )
            for k, name in enumerate(SPLIT_NAMES)
        })  # fmt: skip
        # One shard per split, also for an empty split: datasets writes no data file for an empty
        # dataset by default, and then cannot load it back.
        splits_dict.save_to_disk(os.path.join(path, table), num_shards={name: 1 for name in SPLIT_NAMES})
        counts[table] = {name: len(rows[table][k]) for k, name in enumerate(SPLIT_NAMES)}

    world = {
        "version": VERSION,
        "arguments": {
            "num_images": num_images,
            "seed": seed,
            "box_jitter": box_jitter,
            "num_distractors": num_distractors,
            "tag_noise": tag_noise,
            "splits": list(splits),
        },
        "family_size": FAMILY_SIZE,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "concept_names": CONCEPT_NAMES,
        "synonyms": SHAPE_SYNONYMS,
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "feature_dim": FEATURE_DIM,
        "feature_function": FEATURE_FUNCTION,
        "ve_labels": VE_LABELS,
        "answer_vocabulary": ANSWER_VOCABULARY,
        "question_options": QUESTION_OPTIONS,
        "counts": counts,
    }
    with open(os.path.join(path, "world.json"), "w") as f:
        json.dump(world, f, indent=2)
        f.write("\n")
    return world


def build_world(
    output_dir,
    num_images: int = 2000,
    seed: int = 0,
    box_jitter: float = 0.1,
    num_distractors: int = 2,
    tag_noise: float = 0.1,
    splits=(0.8, 0.1, 0.1),
    overwrite: bool = False,
) -> str:
    """Generate a world into `output_dir` and return its path.

    Everything is written into a temporary sibling folder and renamed into place at the end, so
    `output_dir` either holds a complete world or does not exist; a failed build leaves nothing.
    """
    if num_images < 1 or num_distractors < 0 or not 0 <= tag_noise <= 1 or not 0 <= box_jitter < 0.5:
        raise ValueError(
            "need num_images >= 1, num_distractors >= 0, 0 <= tag_noise <= 1 and 0 <= box_jitter < 0.5, got "
            f"{num_images}, {num_distractors}, {tag_noise}, {box_jitter}"
        )
    _split_sizes(num_images, splits)
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir!r} exists and is not empty; pass overwrite=True to replace it")
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    progress_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a dozen tiny saves: their bars would only hide the CLI's counts
    try:
        _write_world(tmp, int(num_images), int(seed), float(box_jitter), int(num_distractors), float(tag_noise),
                     tuple(float(s) for s in splits))  # fmt: skip
        if os.path.exists(output_dir) and os.listdir(output_dir):  # overwrite: move the old world aside first
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(output_dir, os.path.join(old, name))
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress_bars:
            datasets.enable_progress_bars()
    return output_dir


_BUILD_SIGNATURE = inspect.signature(build_world)


def write_images(world_dir) -> str:
    """Render every image of a built world to `world_dir/images/<image_id>.png`, the photos a detector reads
    (`training/extract_regions.py`); images already there are kept, each file appears whole (written, then
    renamed). Returns the folder."""
    world = load_world(world_dir)
    folder = os.path.join(os.fspath(world_dir), "images")
    os.makedirs(folder, exist_ok=True)
    for image_id, scene in zip(world["regions"]["image_id"], world_scenes(world)):
        path = os.path.join(folder, f"{image_id}.png")
        if not os.path.exists(path):
            render(scene).save(path + ".tmp", format="PNG")
            os.replace(path + ".tmp", path)
    return folder


def load_world(output_dir) -> dict:
    """A built world: {"world": world.json, "regions": Dataset, "region_metadata": dict, <table>: DatasetDict}."""
    output_dir = os.fspath(output_dir)
    with open(os.path.join(output_dir, "world.json")) as f:
        world = {"world": json.load(f)}
    world["regions"], world["region_metadata"] = load_region_store(os.path.join(output_dir, "regions"))
    for table in TABLES:
        world[table] = datasets.load_from_disk(os.path.join(output_dir, table))
    return world


def default_world(cache_dir=None, **kwargs) -> str:
    """The path of the world built with these `build_world` arguments, built on first use, then reused.

    The folder name is a hash of the arguments and the generator version, so changing either
    builds a new world instead of silently reusing a stale one.
    """
    if "output_dir" in kwargs or "overwrite" in kwargs:
        raise TypeError("default_world chooses the folder itself; call build_world for a folder of your own")
    bound = _BUILD_SIGNATURE.bind("", **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("output_dir", "overwrite")}
    arguments["splits"] = [float(s) for s in arguments["splits"]]
    key = hashlib.sha256(json.dumps({"version": VERSION, **arguments}, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "cmal", "synthetic"))
    path = os.path.join(cache_dir, f"world-v{VERSION}-{key}")
    if os.path.isfile(os.path.join(path, "world.json")):
        return path
    try:
        build_world(path, **kwargs)
    except OSError:  # another process finished the same world first
        if not os.path.isfile(os.path.join(path, "world.json")):
            raise
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the synthetic CMAL world: region store + task datasets.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--box_jitter", type=float, default=0.1)
    parser.add_argument("--num_distractors", type=int, default=2)
    parser.add_argument("--tag_noise", type=float, default=0.1)
    parser.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = build_world(**vars(args))
    with open(os.path.join(path, "world.json")) as f:
        counts = json.load(f)["counts"]
    print(f"built {path} in {time.perf_counter() - start:.1f} s")
    print(f"regions: {counts['regions']}")
    for name in ("images", *TABLES):
        print(f"{name}: " + ", ".join(f"{split} {n}" for split, n in counts[name].items()))


if __name__ == "__main__":
    main()
