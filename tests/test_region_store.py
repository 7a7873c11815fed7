"""Region store: schema round trip, TSV and npz converters, metadata, atomic shards, resume, validation, CLI."""

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmal.training.convert_features import convert_npz, convert_tsv, read_concept_names
from cmal.training.data.region_store import (
    METADATA_FILE,
    RegionReader,
    RegionStoreWriter,
    load_region_store,
    region_store_features,
    row_to_regions,
)


REPO = Path(__file__).resolve().parents[1]
D = 8

# Three images: a (100x50 pixels, 3 boxes, one overshooting the border), b (no boxes), c (40x80, 2 boxes).
IMAGES = [
    dict(
        image_id="a",
        width=100,
        height=50,
        boxes=[[10, 5, 50, 25], [0, 0, 100, 50], [-2, 10, 103, 60]],
        normalized=[[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1], [0, 0.2, 1, 1]],
        objects_id=[3, 0, 2],
        objects_conf=[0.9, 0.5, 0.25],
    ),
    dict(
        image_id="b",
        width=64,
        height=64,
        boxes=np.zeros((0, 4)),
        normalized=np.zeros((0, 4)),
        objects_id=[],
        objects_conf=[],
    ),
    dict(
        image_id="c",
        width=40,
        height=80,
        boxes=[[4, 8, 20, 40], [30, 60, 40, 80]],
        normalized=[[0.1, 0.1, 0.5, 0.5], [0.75, 0.75, 1, 1]],
        objects_id=[1, 1],
        objects_conf=[0.75, 0.125],
    ),
]
rng = np.random.default_rng(0)
for image in IMAGES:
    image["features"] = rng.normal(size=(len(image["boxes"]), D)).astype(np.float32)


def b64(values, dtype) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def write_butd_tsv(path, images=IMAGES):
    """bottom-up-attention: image_id, image_w, image_h, num_boxes, boxes, features."""
    with open(path, "w") as f:
        for im in images:
            fields = [
                im["image_id"],
                im["width"],
                im["height"],
                len(im["boxes"]),
                b64(im["boxes"], np.float32),
                b64(im["features"], np.float32),
            ]
            f.write("\t".join(map(str, fields)) + "\n")
    return path


def write_lxmert_tsv(path, images=IMAGES):
    """LXMERT: img_id, img_h, img_w (height first), objects_id, objects_conf, attrs_id, attrs_conf, num_boxes,
    boxes, features."""
    with open(path, "w") as f:
        for im in images:
            n = len(im["boxes"])
            fields = [
                im["image_id"],
                im["height"],
                im["width"],
                b64(im["objects_id"], np.int64),
                b64(im["objects_conf"], np.float32),
                b64(np.zeros(n), np.int64),
                b64(np.ones(n), np.float32),
                n,
                b64(im["boxes"], np.float32),
                b64(im["features"], np.float32),
            ]
            f.write("\t".join(map(str, fields)) + "\n")
    return path


def rows(path):
    dataset, metadata = load_region_store(path)
    return list(dataset.with_format("numpy")), metadata


def check_images(stored, images=IMAGES):
    assert [row["image_id"] for row in stored] == [im["image_id"] for im in images]
    for row, im in zip(stored, images):
        n = len(im["boxes"])
        assert row["num_regions"] == n
        assert row["features"].shape == (n, D)
        np.testing.assert_allclose(row["features"], im["features"], rtol=1e-3)
        np.testing.assert_allclose(row["boxes"], np.asarray(im["normalized"]).reshape(-1, 4), rtol=1e-6, atol=1e-7)


def make_row(image_id="x", n=2, **overrides):
    row = dict(
        image_id=image_id,
        image_width=10,
        image_height=10,
        features=np.ones((n, D), np.float32),
        boxes=np.tile([0.1, 0.2, 0.3, 0.4], (n, 1)),
        concept_ids=np.arange(n),
        scores=np.full(n, 0.5),
    )
    row.update(overrides)
    return row


def test_schema_round_trips_dynamic_region_counts_including_zero(tmp_path):
    """Array2D(shape=(None, D)) keeps [N, D] per row, N = 0 included, stored as float16."""
    counts = [3, 0, 1, 0]
    soft = [rng.random((n, 5)).astype(np.float16) for n in counts]
    with RegionStoreWriter(tmp_path / "store", D, num_soft_labels=5, shard_size=3) as writer:
        for i, n in enumerate(counts):
            writer.add(make_row(f"img{i}", n, soft_labels=soft[i]))
    dataset, metadata = load_region_store(tmp_path / "store")
    assert dataset.features == region_store_features(D, 5)
    assert dataset.features["features"].dtype == "float16" and len(dataset) == 4
    assert sorted(os.listdir(tmp_path / "store")) == [METADATA_FILE, "shard-00000", "shard-00001"]
    for row, n, s in zip(dataset.with_format("numpy", dtype=None), counts, soft):
        assert row["features"].shape == (n, D) and row["features"].dtype == np.float16
        assert row["soft_labels"].shape == (n, 5)
        np.testing.assert_array_equal(row["soft_labels"], s)
        np.testing.assert_array_equal(row["concept_ids"], np.arange(n))
    regions = row_to_regions(dataset.with_format("numpy")[0])
    assert regions["boxes_normalized"] is True
    assert regions["features"].shape == (3, D) and regions["features"].dtype == np.float32
    assert regions["concept_ids"].dtype == np.int64 and regions["soft_labels"].shape == (3, 5)
    np.testing.assert_allclose(regions["boxes"], [[0.1, 0.2, 0.3, 0.4]] * 3, rtol=1e-6)
    np.testing.assert_array_equal(regions["scores"], [0.5] * 3)
    empty = row_to_regions(dataset.with_format("numpy")[1])
    assert empty["features"].shape == (0, D) and empty["boxes"].shape == (0, 4)
    assert row_to_regions(dataset[1])["boxes"].shape == (0, 4)  # plain rows work too
    # Zero-copy reads of several rows (repeats and empty images included) give what row-by-row reads give;
    # float16 stays float16 (the model casts on its device): rows formatted without a cast compare exactly.
    table, rows, read = dataset.with_format("numpy", dtype=None), [1, 0, 3, 0, 2], RegionReader(dataset)
    for together, alone in zip(read(rows), [row_to_regions(table[r]) for r in rows], strict=True):
        assert together.keys() == alone.keys()
        for key in alone:
            np.testing.assert_array_equal(together[key], alone[key], strict=True)
    assert [r["features"].shape for r in read([1, 3])] == [(0, D), (0, D)]
    features = read([0])[0]["features"]
    assert features.dtype == np.float16 and not features.flags.owndata  # a view into the store's buffers
    # a selected (or shuffled) store reads through its indices mapping
    selected = dataset.select([3, 0, 2])
    for together, alone in zip(RegionReader(selected)([0, 1, 2]), read([3, 0, 2]), strict=True):
        for key in alone:
            np.testing.assert_array_equal(together[key], alone[key], strict=True)


def test_tsv_bottom_up_attention(tmp_path):
    added, skipped = convert_tsv([write_butd_tsv(tmp_path / "f.tsv")], tmp_path / "store", shard_size=2)
    assert (added, skipped) == (3, 0)
    stored, metadata = rows(tmp_path / "store")
    check_images(stored)
    assert [(r["image_width"], r["image_height"]) for r in stored] == [(100, 50), (64, 64), (40, 80)]
    np.testing.assert_array_equal(stored[0]["concept_ids"], [-1, -1, -1])
    np.testing.assert_array_equal(stored[0]["scores"], [1, 1, 1])
    assert "soft_labels" not in stored[0]
    assert metadata == {
        "schema_version": 1,
        "feature_dim": D,
        "concept_names": None,
        "box_format": "xyxy_normalized",
        "source": "bottom-up-attention tsv",
        "detector": None,
        "num_soft_labels": None,
    }
    assert json.loads((tmp_path / "store" / METADATA_FILE).read_text()) == metadata


def test_tsv_lxmert_variant_with_concept_names(tmp_path):
    names = ["yolk", "goal", "bathroom", "macaroni"]
    convert_tsv([write_lxmert_tsv(tmp_path / "f.tsv")], tmp_path / "store", concept_names=names)
    stored, metadata = rows(tmp_path / "store")
    check_images(stored)  # the boxes come out right only if img_h / img_w were read in LXMERT's order
    assert (stored[0]["image_width"], stored[0]["image_height"]) == (100, 50)
    for row, im in zip(stored, IMAGES):
        np.testing.assert_array_equal(row["concept_ids"], im["objects_id"])
        np.testing.assert_allclose(row["scores"], im["objects_conf"], rtol=1e-6)
    assert metadata["concept_names"] == names


def test_tsv_errors_name_the_line_and_field(tmp_path):
    path = write_butd_tsv(tmp_path / "f.tsv")
    with open(path, "a") as f:
        f.write("d\t1\t2\t3\t4\t5\t6\n")
    with pytest.raises(ValueError, match=r"f\.tsv, line 4: 7 tab-separated fields, expected 6 .* or 10"):
        convert_tsv([path], tmp_path / "store")
    with pytest.raises(ValueError, match=r"line 1: .*image 'a': `concept_ids` must be -1 \(none\) or in \[0, 2\)"):
        convert_tsv([write_lxmert_tsv(tmp_path / "x.tsv")], tmp_path / "other", concept_names=["p", "q"])
    bad = tmp_path / "bad.tsv"  # num_boxes says 3, the boxes field holds 2
    bad.write_text(f"a\t100\t50\t3\t{b64(np.ones((2, 4)), np.float32)}\t{b64(np.ones((3, D)), np.float32)}\n")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 1: `boxes` holds 8 float32 values, expected 12"):
        convert_tsv([bad], tmp_path / "third")


def write_uniter_npz(folder, num_classes=4):
    """UNITER: features [N, D] fp16, norm_bb [N, 6] (x1, y1, x2, y2, w, h), conf [N], soft_labels [N, 1 + C]."""
    folder.mkdir()
    expected = []
    for im in IMAGES:
        n = len(im["boxes"])
        norm = np.asarray(im["normalized"], np.float32).reshape(n, 4)
        soft = rng.random((n, num_classes + 1)).astype(np.float32)
        soft[:, 0] = 5.0  # background dominates: must not become the concept
        np.savez(
            folder / f"{im['image_id']}.npz",
            features=im["features"].astype(np.float16),
            norm_bb=np.concatenate([norm, norm[:, 2:] - norm[:, :2]], axis=1),
            conf=np.full(n, 0.75, np.float32),
            soft_labels=soft,
        )
        expected.append(soft[:, 1:])
    return expected


def test_npz_uniter_with_soft_labels(tmp_path):
    soft = write_uniter_npz(tmp_path / "npz")
    assert convert_npz(tmp_path / "npz", tmp_path / "store") == (3, 0)
    stored, metadata = rows(tmp_path / "store")
    check_images(stored)
    assert metadata["num_soft_labels"] == 4 and metadata["source"] == "npz"
    for row, expected in zip(stored, soft):
        assert (row["image_width"], row["image_height"]) == (0, 0)  # UNITER keeps no image size
        np.testing.assert_allclose(row["soft_labels"], expected, rtol=1e-3)
        np.testing.assert_array_equal(row["concept_ids"], expected.argmax(axis=1))
        np.testing.assert_array_equal(row["scores"], [0.75] * len(expected))
    assert row_to_regions(stored[2])["soft_labels"].shape == (2, 4)


def test_npz_bottom_up_attention_pytorch(tmp_path):
    """MILVLG's layout; its `objects_id` count the background as class 0 (real extractor output is c + 1)."""
    folder = tmp_path / "npz"
    folder.mkdir()
    for im in IMAGES:
        info = {
            "objects_id": np.asarray(im["objects_id"], np.int64) + 1,  # MILVLG: column 0 is the background
            "objects_conf": np.asarray(im["objects_conf"], np.float32),
        }
        np.savez_compressed(
            folder / f"{im['image_id']}.npz",
            x=im["features"],
            bbox=np.asarray(im["boxes"], np.float32),
            num_bbox=len(im["boxes"]),
            image_h=im["height"],
            image_w=im["width"],
            info=info,
        )
    convert_npz(folder, tmp_path / "store")
    stored, _ = rows(tmp_path / "store")
    check_images(stored)
    assert [(r["image_width"], r["image_height"]) for r in stored] == [(100, 50), (64, 64), (40, 80)]
    for row, im in zip(stored, IMAGES):
        np.testing.assert_array_equal(row["concept_ids"], im["objects_id"])
        np.testing.assert_allclose(row["scores"], im["objects_conf"], rtol=1e-6)

    background = tmp_path / "background"
    background.mkdir()
    np.savez(background / "e.npz", x=np.zeros((2, D), np.float32), bbox=np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32),
             image_h=10, image_w=10, info={"objects_id": np.array([0, 5]), "objects_conf": np.array([0.2, 0.9])})  # fmt: skip
    convert_npz(background, tmp_path / "store-background")
    np.testing.assert_array_equal(rows(tmp_path / "store-background")[0][0]["concept_ids"], [-1, 4])

    np.savez(folder / "d.npz", feats=np.zeros((1, D)))
    with pytest.raises(ValueError, match=r"d\.npz: unknown \.npz layout with keys \['feats'\]"):
        convert_npz(folder, tmp_path / "store")


def test_leftover_tmp_shard_is_ignored_then_removed(tmp_path):
    store = tmp_path / "store"
    convert_tsv([write_butd_tsv(tmp_path / "f.tsv")], store, shard_size=2)
    shutil.copytree(store / "shard-00001", store / "shard-00002.tmp")  # looks complete inside, but was never renamed
    assert len(load_region_store(store)[0]) == 3
    with RegionStoreWriter(store, D, source="bottom-up-attention tsv") as writer:
        assert not (store / "shard-00002.tmp").exists()
        assert writer.done_image_ids == {"a", "b", "c"}


def test_resume_after_a_kill_stores_every_image_once_in_order(tmp_path):
    tsv, store = write_butd_tsv(tmp_path / "f.tsv"), tmp_path / "store"
    # Killed after the second shard was renamed, while the third was being written.
    convert_tsv([tsv], store, shard_size=1)
    shutil.rmtree(store / "shard-00002")
    (store / "shard-00002.tmp").mkdir()
    assert convert_tsv([tsv], store, shard_size=1) == (1, 2)
    check_images(rows(store)[0])
    assert sorted(os.listdir(store)) == [METADATA_FILE, "shard-00000", "shard-00001", "shard-00002"]
    assert convert_tsv([tsv], store, shard_size=1) == (0, 3)  # a finished store is left as it is

    # Killed with one validated image still buffered (never written): it is redone, nothing else.
    other = tmp_path / "other"
    writer = RegionStoreWriter(other, D, source="bottom-up-attention tsv", shard_size=2)
    for im in IMAGES:
        writer.add(
            dict(
                image_id=im["image_id"],
                image_width=im["width"],
                image_height=im["height"],
                features=im["features"],
                boxes=np.asarray(im["normalized"], np.float32).reshape(-1, 4),
            )
        )
    del writer  # no close(): "a" and "b" are in shard-00000, "c" is lost with the process
    assert len(load_region_store(other)[0]) == 2
    assert convert_tsv([tsv], other, shard_size=2) == (1, 2)
    check_images(rows(other)[0])


def test_resume_refuses_a_different_store(tmp_path):
    store = tmp_path / "store"
    convert_tsv([write_butd_tsv(tmp_path / "f.tsv")], store)
    with pytest.raises(ValueError, match=r"cannot resume .*feature_dim: stored 8, given 16"):
        RegionStoreWriter(store, 16, source="bottom-up-attention tsv")
    with pytest.raises(ValueError, match=r"concept_names: stored None, given \['p'\]; source: stored"):
        RegionStoreWriter(store, D, concept_names=["p"], source="npz")
    with pytest.raises(ValueError, match="not a CMAL region store"):
        load_region_store(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither empty nor a CMAL region store"):
        RegionStoreWriter(tmp_path / "busy", D)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(features=np.ones((2, 7))), r"image 'x': `features` must have shape \[N, 8\], got \[2, 7\]"),
        (dict(features=np.full((2, D), np.nan)), r"image 'x': `features` must be finite"),
        (dict(features=np.full((2, D), 1e5)), r"`features` must be finite \(\|value\| <= 65504 for float16\)"),
        (dict(features=np.ones((2, D), dtype=object)), r"`features` must be numeric, got dtype object"),
        (dict(boxes=np.full((2, 4), 1.5)), r"image 'x': `boxes` must be normalised .* in \[0, 1\]"),
        (dict(boxes=np.tile([0.5, 0.1, 0.2, 0.4], (2, 1))), r"`boxes` must be .* x1 <= x2"),
        (dict(boxes=np.ones((3, 4))), r"`boxes` must have shape \[2, 4\], got \[3, 4\]"),
        (dict(scores=np.ones(3)), r"`scores` must have shape \[2\], got \[3\]"),
        (dict(concept_ids=np.array([0.0, 1.0])), r"`concept_ids` must be integer, got dtype float64"),
        (dict(concept_ids=np.array([-2, 0])), r"`concept_ids` must be -1 \(none\) or non-negative"),
        (dict(num_regions=3), r"`num_regions` is 3 but `features` has 2 rows"),
        (dict(image_width=-1), r"image 'x': `image_width` must be a non-negative int"),
        (dict(box=1), r"image 'x': unknown field\(s\) \['box'\]"),
        (dict(image_id=""), r"`image_id` must be a non-empty string"),
    ],
)
def test_validation_errors_name_the_field_and_image(tmp_path, overrides, message):
    writer = RegionStoreWriter(tmp_path / "store", D)
    with pytest.raises(ValueError, match=message):
        writer.add(make_row(**overrides))


def test_duplicates_and_missing_soft_labels_are_rejected(tmp_path):
    writer = RegionStoreWriter(tmp_path / "store", D, num_soft_labels=3)
    with pytest.raises(ValueError, match=r"image 'x': `soft_labels` is missing"):
        writer.add(make_row())
    writer.add(make_row(soft_labels=np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"image 'x' is already in the store"):
        writer.add(make_row(soft_labels=np.zeros((2, 3))))


def test_cli(tmp_path):
    tsv, names = write_lxmert_tsv(tmp_path / "f.tsv"), tmp_path / "objects_vocab.txt"
    names.write_text("yolk\ngoal\nbathroom\nmacaroni\n")
    command = [
        sys.executable,
        "training/convert_features.py",
        "tsv",
        "--tsv",
        str(tsv),
        "--output_dir",
        str(tmp_path / "store"),
        "--concept_names",
        str(names),
        "--shard_size",
        "2",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "added 3 images, skipped 0" in result.stdout
    stored, metadata = rows(tmp_path / "store")
    check_images(stored)
    assert metadata["concept_names"] == ["yolk", "goal", "bathroom", "macaroni"]

    write_uniter_npz(tmp_path / "npz")
    command = [
        sys.executable,
        "training/convert_features.py",
        "npz",
        "--npz_dir",
        str(tmp_path / "npz"),
        "--output_dir",
        str(tmp_path / "store"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "cannot resume" in result.stderr


def test_visual_genome_synonym_lines_name_the_concept_by_their_first_entry(tmp_path):
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("yolk\ntelevision,tv\nbathroom sink, sink\n")
    assert read_concept_names(str(vocab)) == ["yolk", "television", "bathroom sink"]


def test_training_refuses_a_store_without_concept_names(tmp_path):
    with RegionStoreWriter(str(tmp_path / "store"), D, None, source="test") as writer:
        writer.add(dict(image_id="a", image_width=10, image_height=10, features=np.zeros((1, D), np.float32),
                        boxes=[[0, 0, 1, 1]]))  # fmt: skip
    assert load_region_store(str(tmp_path / "store"))[1]["concept_names"] is None  # reading alone is fine
    with pytest.raises(ValueError, match=r"region store .* has no concept names \(converted without --concept_names\): "
                                         r".*convert it again with --concept_names FILE"):  # fmt: skip
        load_region_store(str(tmp_path / "store"), require_concept_names=True)


def test_an_image_id_repeated_across_tsv_files_is_refused_not_dropped(tmp_path):
    first = write_butd_tsv(tmp_path / "a.tsv")
    second = tmp_path / "b.tsv"
    second.write_bytes(Path(first).read_bytes().splitlines(keepends=True)[0])  # image "a" again
    with pytest.raises(ValueError, match=r"b.tsv, line 1: image id 'a' came already at .*a.tsv, line 1: ids must be unique"):
        convert_tsv([first, str(second)], tmp_path / "store")


def copy_shard_in_twice(store):
    shutil.copytree(store / "shard-00000", store / "shard-00009")


def edit_sidecar(store, **fields):
    metadata = json.loads((store / "cmal_region_store.json").read_text())
    (store / "cmal_region_store.json").write_text(json.dumps({**metadata, **fields}))


@pytest.mark.parametrize("damage, message", [
    (copy_shard_in_twice, r"holds image id 'a' twice \(shard-00000, row 0 and shard-00009, row 0\): ids must be unique"),
    (lambda store: edit_sidecar(store, feature_dim=D + 4),
     rf"shard shard-00000 holds {D}-d features but its cmal_region_store.json says feature_dim {D + 4}"),
    (lambda store: None, None),  # the intact store: the checks pass it
])  # fmt: skip
def test_a_store_that_contradicts_itself_is_refused_on_open(tmp_path, damage, message):
    store = tmp_path / "store"
    convert_tsv([write_butd_tsv(tmp_path / "f.tsv")], store, shard_size=2)
    damage(store)
    if message is None:
        assert len(load_region_store(store)[0]) == 3
        return
    with pytest.raises(ValueError, match=rf"^the region store '{store}':? " + message):
        load_region_store(store)


def test_the_region_store_imports_no_training_stack():
    """The data layer's store loads without torch, transformers, accelerate or the training loop (its JSON writer
    is `training/data/files.py`): a worker or a converter that reads stores starts in about a second, not thirteen."""
    code = ("import sys, cmal.training.data.region_store; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'cmal.training.runtime', 'cmal.training.loop') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
