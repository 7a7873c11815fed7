"""Convert precomputed region features into the CMAL region store (schema: docs/DATA.md).

    python training/convert_features.py tsv --tsv trainval_36.tsv --output_dir regions/coco \\
        --concept_names objects_vocab.txt
    python training/convert_features.py npz --npz_dir coco_npz/ --output_dir regions/coco

Re-running the same command after an interruption skips the images already stored.
"""

import argparse
import base64
import binascii
import os
import zipfile

import datasets
import numpy as np
from tqdm import tqdm

from cmal.training.data.region_store import RegionStoreWriter
from cmal.training.data.safe_pickle import load_npz_object


# bottom-up-attention's generate_tsv.py writes 6 fields; LXMERT's TSVs add object and attribute
# predictions and put the height before the width (LXMERT names them img_id, img_h, img_w).
BUTD_FIELDS = "image_id image_w image_h num_boxes boxes features".split()
LXMERT_FIELDS = "image_id image_h image_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features".split()
TSV_SOURCE = "bottom-up-attention tsv"
NPZ_SOURCE = "npz"


def read_concept_names(path: str) -> list[str]:
    """One name per line, the line index being the concept id (as in Visual Genome's objects_vocab.txt).

    Visual Genome lists synonyms on one line ("television,tv"): the first is the concept's name (the
    anchor lexicon's synonyms cover the others); the whole line would match no word of any text.
    """
    with open(path) as f:
        return [line.split(",")[0].strip() for line in f.read().splitlines()]


def normalize_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Absolute pixel x1, y1, x2, y2 -> [0, 1], clipped: detectors overshoot the border by a pixel or so."""
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot normalise boxes by an image size of {width}x{height}")
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale, 0.0, 1.0)


def _b64(field: bytes, name: str) -> bytes:
    try:
        return base64.b64decode(field, validate=True)
    except binascii.Error as error:
        raise ValueError(f"`{name}` is not valid base64 ({error}): {field[:20]!r}...") from None


def _b64_array(field: bytes, dtype, shape: tuple, name: str) -> np.ndarray:
    array = np.frombuffer(_b64(field, name), dtype=dtype)
    if array.size != np.prod(shape):
        expected = f"expected {np.prod(shape)} for shape {list(shape)}"
        raise ValueError(f"`{name}` holds {array.size} {np.dtype(dtype).name} values, {expected}")
    return array.reshape(shape)


def split_tsv_line(line: bytes) -> dict:
    """A TSV line -> its named (still encoded) fields; the field count tells the variant apart."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) == len(BUTD_FIELDS):
        return dict(zip(BUTD_FIELDS, fields))
    if len(fields) == len(LXMERT_FIELDS):
        return dict(zip(LXMERT_FIELDS, fields))
    raise ValueError(
        f"{len(fields)} tab-separated fields, expected {len(BUTD_FIELDS)} (bottom-up-attention: "
        f"{', '.join(BUTD_FIELDS)}) or {len(LXMERT_FIELDS)} (LXMERT: {', '.join(LXMERT_FIELDS)})"
    )


def _count(fields: dict, name: str) -> int:
    """A TSV field that holds a whole number (`num_boxes`, `image_w`, `image_h`), named when it does not."""
    try:
        value = int(fields[name])
    except ValueError:
        raise ValueError(f"`{name}` must be a whole number, got {fields[name].decode(errors='replace')[:40]!r}") from None
    if value < 0:
        raise ValueError(f"`{name}` must not be negative, got {value}")
    return value


def tsv_row(fields: dict, feature_dim: int) -> dict:
    """Decoded fields -> a store row. LXMERT's objects become concepts and scores; attributes are dropped."""
    n, width, height = (_count(fields, name) for name in ("num_boxes", "image_w", "image_h"))
    row = {
        "image_id": fields["image_id"].decode(),
        "image_width": width,
        "image_height": height,
        "features": _b64_array(fields["features"], np.float32, (n, feature_dim), "features"),
        "boxes": normalize_boxes(_b64_array(fields["boxes"], np.float32, (n, 4), "boxes"), width, height),
    }
    if "objects_id" in fields:
        row["concept_ids"] = _b64_array(fields["objects_id"], np.int64, (n,), "objects_id")
        row["scores"] = _b64_array(fields["objects_conf"], np.float32, (n,), "objects_conf")
    return row


def tsv_feature_dim(tsv_files: list[str]) -> int:
    """D, read from the first image that has boxes (an image with none carries no width)."""
    for path in tsv_files:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    fields = split_tsv_line(line)
                    n, size = _count(fields, "num_boxes"), len(_b64(fields["features"], "features")) // 4
                    if n and size % n:
                        raise ValueError(f"{size} feature values do not split into {n} boxes")
                except ValueError as error:
                    raise ValueError(f"{path}, line {line_no}: {error}") from error
                if n:
                    return size // n
    raise ValueError(f"no image in {tsv_files} has boxes, so the feature size cannot be inferred")


def convert_tsv(
    tsv_files: list[str], output_dir: str, concept_names: list[str] | None = None, shard_size: int = 1000
) -> tuple[int, int]:
    """Bottom-up-attention / LXMERT TSV files -> a region store. Returns (images added, images skipped)."""
    feature_dim = tsv_feature_dim(tsv_files)
    added = skipped = 0
    with RegionStoreWriter(output_dir, feature_dim, concept_names, source=TSV_SOURCE, shard_size=shard_size) as writer:
        resumed = set(writer.done_image_ids)  # an interrupted run's images are skipped; any other repeat is a clash
        total = sum(os.path.getsize(path) for path in tsv_files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="tsv") as progress:
            for path in tsv_files:
                with open(path, "rb") as f:
                    for line_no, line in enumerate(f, start=1):
                        progress.update(len(line))
                        if not line.strip():
                            continue
                        try:
                            fields = split_tsv_line(line)
                            image_id = fields["image_id"].decode()
                            if image_id in resumed:
                                skipped += 1
                                continue
                            if image_id in writer.done_image_ids:
                                raise ValueError(f"image id {image_id!r} came already at {first_line(tsv_files, image_id)}: "
                                                 "ids must be unique across the files (the same image extracted twice?)")  # fmt: skip
                            writer.add(tsv_row(fields, feature_dim))
                        except ValueError as error:
                            raise ValueError(f"{path}, line {line_no}: {error}") from error
                        added += 1
    return added, skipped


def first_line(tsv_files: list[str], image_id: str) -> str:
    """Where `image_id` first appears in the TSV files: read again only to name a clash, so a conversion keeps
    no location per image."""
    wanted = image_id.encode() + b"\t"
    for path in tsv_files:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line.startswith(wanted):
                    return f"{path}, line {line_no}"
    return "an earlier line"


def npz_row(path: str) -> dict:
    """One per-image .npz (image id = file stem) -> a store row, its arrays' shapes checked."""
    try:
        row = _npz_layout(path)
    except IndexError as error:  # slicing a 1-D array where [N, ...] was due
        raise ValueError(f"{path}: an array has too few dimensions ({error}); expected [N, D] features and [N, 4] boxes") from None
    except ValueError as error:
        raise ValueError(error if str(error).startswith(path) else f"{path}: {error}") from None
    n = len(row["features"]) if row["features"].ndim else 0
    shapes = {"features": "[N, D]", "boxes": "[N, 4]", "scores": "[N]", "concept_ids": "[N]", "soft_labels": "[N, C]"}
    for name, layout in shapes.items():
        if name in row:
            value = np.asarray(row[name])
            if value.ndim != layout.count(",") + 1 or len(value) != n or (name == "boxes" and value.shape[1] != 4):
                raise ValueError(f"{path}: `{name}` must have shape {layout} with N = {n} regions, got shape {list(value.shape)}")
    return row


def _npz_layout(path: str) -> dict:
    """One per-image .npz (image id = file stem) -> a store row; the layout is told by its keys."""
    image_id = os.path.splitext(os.path.basename(path))[0]
    try:
        archive = np.load(path)  # never with allow_pickle: a downloaded file is not unpickled
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not an .npz archive of arrays ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive of named arrays")
    with archive as npz:
        keys = set(npz.files)
        if {"features", "norm_bb", "conf"} <= keys:
            # UNITER: boxes already normalised (x1, y1, x2, y2[, w, h]); the image size is not kept, so 0.
            row = {
                "image_id": image_id,
                "image_width": 0,
                "image_height": 0,
                "features": npz["features"],
                "boxes": np.clip(npz["norm_bb"][:, :4].astype(np.float32), 0.0, 1.0),
                "scores": npz["conf"],
            }
            if "soft_labels" in keys:
                # Column 0 is the background class: keep columns 1: as they are (not renormalised).
                soft_labels = npz["soft_labels"][:, 1:]
                row["soft_labels"] = soft_labels
                row["concept_ids"] = soft_labels.argmax(axis=1)
            return row
        if {"x", "bbox", "image_w", "image_h"} <= keys:
            # bottom-up-attention.pytorch (MILVLG): absolute boxes and the image size.
            width, height = int(npz["image_w"]), int(npz["image_h"])
            row = {
                "image_id": image_id,
                "image_width": width,
                "image_height": height,
                "features": npz["x"],
                "boxes": normalize_boxes(npz["bbox"], width, height),
            }
            if "num_bbox" in keys:
                row["num_regions"] = int(npz["num_bbox"])
            if "info" in keys:
                info = load_npz_object(path, "info").item()  # a pickled dict, read without running code
                # MILVLG's extractor takes the argmax over all score columns, column 0 being the background:
                # class c is stored as c + 1, and 0 (background won) is no concept
                row["concept_ids"] = np.asarray(info["objects_id"]) - 1
                row["scores"] = np.asarray(info["objects_conf"])
            return row
    raise ValueError(
        f"unknown .npz layout with keys {sorted(keys)}; expected UNITER (features, norm_bb, conf"
        f"[, soft_labels]) or bottom-up-attention.pytorch (MILVLG) (x, bbox, image_w, image_h[, num_bbox, info])"
    )


def convert_npz(
    npz_dir: str, output_dir: str, concept_names: list[str] | None = None, shard_size: int = 1000
) -> tuple[int, int]:
    """A folder of per-image .npz files, in file-name order -> a region store. Returns (added, skipped)."""
    files = sorted(os.path.join(npz_dir, name) for name in os.listdir(npz_dir) if name.endswith(".npz"))
    if not files:
        raise ValueError(f"no .npz files in {npz_dir!r}")
    first = npz_row(files[0])  # fixes D and the soft-label width for the whole store
    feature_dim = first["features"].shape[1]
    num_soft_labels = first["soft_labels"].shape[1] if "soft_labels" in first else None
    added = skipped = 0
    with RegionStoreWriter(
        output_dir,
        feature_dim,
        concept_names,
        source=NPZ_SOURCE,
        num_soft_labels=num_soft_labels,
        shard_size=shard_size,
    ) as writer:
        for path in tqdm(files, unit="img", desc="npz"):
            if os.path.splitext(os.path.basename(path))[0] in writer.done_image_ids:
                skipped += 1
                continue
            writer.add(npz_row(path))
            added += 1
    return added, skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="format", required=True)
    tsv = subparsers.add_parser("tsv", help="bottom-up-attention (6 fields) or LXMERT (10 fields) TSV files")
    tsv.add_argument("--tsv", nargs="+", required=True, help="one or more TSV files, read in the order given")
    npz = subparsers.add_parser("npz", help="a folder of per-image .npz files (UNITER or bottom-up-attention.pytorch (MILVLG))")
    npz.add_argument("--npz_dir", required=True)
    for subparser in (tsv, npz):
        subparser.add_argument("--output_dir", required=True, help="the store folder; an existing store is resumed")
        subparser.add_argument("--concept_names", help="text file, one concept name per line (line index = concept id)")
        subparser.add_argument("--shard_size", type=int, default=1000, help="images per shard")
    args = parser.parse_args(argv)

    datasets.disable_progress_bars()  # one bar for the conversion, not one per shard saved
    concept_names = read_concept_names(args.concept_names) if args.concept_names else None
    if args.format == "tsv":
        added, skipped = convert_tsv(args.tsv, args.output_dir, concept_names, args.shard_size)
    else:
        added, skipped = convert_npz(args.npz_dir, args.output_dir, concept_names, args.shard_size)
    print(f"{args.output_dir}: added {added} images, skipped {skipped} already stored")


if __name__ == "__main__":
    main()
