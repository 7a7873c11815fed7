"""One Arrow schema for precomputed image-region features, stored in atomic, resumable shards.

Detector runs, bottom-up-attention TSVs and per-image `.npz` files all describe the same thing: for
each image, N regions with a feature vector, a box, a concept and a score. They all land in this one
`datasets` schema, so training reads a single format and never guesses units or box conventions.
See docs/DATA.md for the schema table and the routes into it.

A store is a folder:

    cmal_region_store.json   the sidecar: schema version, feature size, concept names, provenance
    shard-00000/             a `Dataset.save_to_disk` folder, up to `shard_size` images
    shard-00001/ ...

A shard is written under `shard-XXXXX.tmp` and renamed into place, so a killed writer never leaves a
half shard that looks complete; reopening the store removes the leftovers and carries on after the
last complete shard.
"""

import json
import os
import re
import shutil

import datasets
import numpy as np
import pyarrow as pa
from cmal.training.data.files import write_json


SCHEMA_VERSION = 1
METADATA_FILE = "cmal_region_store.json"
BOX_FORMAT = "xyxy_normalized"
SHARD_PATTERN = re.compile(r"shard-(\d+)")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def region_store_features(feature_dim: int, num_soft_labels: int | None = None) -> datasets.Features:
    """The store's columns; `soft_labels` exists only when the source has class distributions.

    `Array2D` with a dynamic first dimension keeps [N, D] arrays (N = 0 included) as one flat
    buffer per column, so `with_format("numpy")` gives back 2-D arrays without Python lists.
    """
    columns = {
        "image_id": datasets.Value("string"),
        "image_width": datasets.Value("int32"),
        "image_height": datasets.Value("int32"),
        "num_regions": datasets.Value("int32"),
        "features": datasets.Array2D(shape=(None, feature_dim), dtype="float16"),
        "boxes": datasets.Array2D(shape=(None, 4), dtype="float32"),
        "concept_ids": datasets.Sequence(datasets.Value("int32")),
        "scores": datasets.Sequence(datasets.Value("float32")),
    }
    if num_soft_labels:
        columns["soft_labels"] = datasets.Array2D(shape=(None, num_soft_labels), dtype="float16")
    return datasets.Features(columns)


def _shard_dirs(path: str) -> list[str]:
    """Complete shard folders in shard order (names only; `.tmp` folders do not match)."""
    names = [name for name in os.listdir(path) if SHARD_PATTERN.fullmatch(name)]
    return sorted(names, key=lambda name: int(SHARD_PATTERN.fullmatch(name).group(1)))


def _read_metadata(path: str) -> dict:
    sidecar = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(sidecar):
        raise ValueError(f"{path!r} is not a CMAL region store: it has no {METADATA_FILE}")
    with open(sidecar) as f:
        metadata = json.load(f)
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{sidecar} has schema_version {metadata.get('schema_version')!r}; this code reads version {SCHEMA_VERSION}"
        )
    return metadata


class RegionStoreWriter:
    """Validates rows and appends them to a store in shards of `shard_size` images.

    Opening an existing store resumes it: the metadata must match, numbering continues after the
    last complete shard, and `done_image_ids` lists the images already stored so the caller can
    skip them. Rows still buffered when the writer closes (also on an exception) are flushed; they
    were all validated. One writer per store at a time.
    """

    def __init__(
        self,
        path: str,
        feature_dim: int,
        concept_names: list[str] | None = None,
        source: str = "detector",
        detector: dict | None = None,
        num_soft_labels: int | None = None,
        shard_size: int = 1000,
    ):
        if feature_dim < 1 or shard_size < 1 or (num_soft_labels is not None and num_soft_labels < 1):
            raise ValueError(
                f"feature_dim, shard_size and num_soft_labels must be positive, "
                f"got {feature_dim}, {shard_size}, {num_soft_labels}"
            )
        path = os.fspath(path)
        self.path = path
        self.shard_size = shard_size
        metadata = {
            "schema_version": SCHEMA_VERSION,
            "feature_dim": feature_dim,
            "concept_names": list(concept_names) if concept_names is not None else None,
            "box_format": BOX_FORMAT,
            "source": source,
            "detector": detector,
            "num_soft_labels": num_soft_labels,
        }
        self.metadata = json.loads(json.dumps(metadata))  # as the sidecar holds it, so a resume compares equal
        self.features = region_store_features(feature_dim, num_soft_labels)
        self.done_image_ids: set[str] = set()
        self._rows: list[dict] = []

        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, METADATA_FILE)):
            stored = _read_metadata(path)
            different = sorted(key for key in self.metadata if stored.get(key) != self.metadata[key])
            if different:
                details = "; ".join(
                    f"{key}: stored {stored.get(key)!r}, given {self.metadata[key]!r}" for key in different
                )
                raise ValueError(f"cannot resume {path!r}, its metadata differs: {details}")
        elif os.listdir(path):
            raise ValueError(
                f"{path!r} is neither empty nor a CMAL region store (no {METADATA_FILE}); refusing to write"
            )
        # The sidecar goes first, so a store killed before close() is still recognised and resumable.
        write_json(os.path.join(path, METADATA_FILE), self.metadata)

        for name in os.listdir(path):
            leftover = os.path.join(path, name)
            if name.endswith(".tmp") and os.path.isdir(leftover):  # a shard a killed writer never finished
                shutil.rmtree(leftover)
            elif name.endswith(".tmp"):
                os.remove(leftover)
        shards = _shard_dirs(path)
        for name in shards:
            self.done_image_ids.update(datasets.load_from_disk(os.path.join(path, name))["image_id"])
        self._next_shard = int(SHARD_PATTERN.fullmatch(shards[-1]).group(1)) + 1 if shards else 0

    def add(self, row: dict) -> None:
        """Validate one image's regions and buffer them; a full buffer becomes a shard.

        Keys: image_id (str), image_width, image_height (pixels; 0 = unknown), features [N, D],
        boxes [N, 4] normalised x1, y1, x2, y2; optional concept_ids [N] (default -1), scores [N]
        (default 1.0), num_regions (checked against N); soft_labels [N, C] iff the store has them.
        """
        self._rows.append(self._validate(row))
        self.done_image_ids.add(row["image_id"])
        if len(self._rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard: into `shard-XXXXX.tmp`, then renamed into place."""
        if not self._rows:
            return
        columns = {name: [row[name] for row in self._rows] for name in self.features}
        final = os.path.join(self.path, f"shard-{self._next_shard:05d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_dict(columns, features=self.features).save_to_disk(tmp)
        os.replace(tmp, final)
        self._next_shard += 1
        self._rows = []

    def close(self) -> None:
        """Flush the last, partial shard (the sidecar was written when the store was opened)."""
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _validate(self, row: dict) -> dict:
        image_id = row.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"`image_id` must be a non-empty string, got {image_id!r}")
        where = f"image {image_id!r}"
        if image_id in self.done_image_ids:
            raise ValueError(f"{where} is already in the store; skip ids in `done_image_ids`")
        allowed = set(self.features)
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; the store takes {sorted(allowed)}")

        out = {"image_id": image_id}
        for name in ("image_width", "image_height"):
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**31:
                raise ValueError(f"{where}: `{name}` must be a non-negative int (pixels, 0 = unknown), got {value!r}")
            out[name] = int(value)

        dim = self.metadata["feature_dim"]
        features = _checked_array(row.get("features"), "features", np.float16, (None, dim), where)
        n = len(features)
        if "num_regions" in row and row["num_regions"] != n:
            raise ValueError(f"{where}: `num_regions` is {row['num_regions']!r} but `features` has {n} rows")
        boxes = _checked_array(row.get("boxes"), "boxes", np.float32, (n, 4), where)
        if ((boxes < 0) | (boxes > 1)).any() or (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError(
                f"{where}: `boxes` must be normalised (x1, y1, x2, y2) in [0, 1] with x1 <= x2 and y1 <= y2, "
                f"got range [{boxes.min()}, {boxes.max()}]"
            )
        concept_ids = row.get("concept_ids", np.full(n, -1))
        concept_ids = _checked_array(concept_ids, "concept_ids", np.int32, (n,), where)
        names = self.metadata["concept_names"]
        if (concept_ids < -1).any() or (names is not None and (concept_ids >= len(names)).any()):
            allowed_ids = f"in [0, {len(names)}) (len(concept_names))" if names is not None else "non-negative"
            raise ValueError(
                f"{where}: `concept_ids` must be -1 (none) or {allowed_ids}, "
                f"got range [{concept_ids.min()}, {concept_ids.max()}]"
            )
        scores = _checked_array(row.get("scores", np.ones(n)), "scores", np.float32, (n,), where)
        out.update(num_regions=n, features=features, boxes=boxes, concept_ids=concept_ids, scores=scores)
        if self.metadata["num_soft_labels"]:
            shape = (n, self.metadata["num_soft_labels"])
            out["soft_labels"] = _checked_array(row.get("soft_labels"), "soft_labels", np.float16, shape, where)
        return out


def _checked_array(value, name: str, dtype, shape: tuple, where: str) -> np.ndarray:
    """`value` as a `dtype` array of `shape` (None = any), finite after the cast (float16 overflows at 65504)."""
    if value is None:
        raise ValueError(f"{where}: `{name}` is missing")
    array = np.asarray(value)
    integer = np.issubdtype(dtype, np.integer)
    accepted = array.dtype.kind in ("iu" if integer else "iuf") or (array.size == 0 and array.dtype.kind in "iuf")
    if not accepted:
        kind = "integer" if integer else "numeric"
        raise ValueError(f"{where}: `{name}` must be {kind}, got dtype {array.dtype}")
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "[" + ", ".join("N" if want is None else str(want) for want in shape) + "]"
        raise ValueError(f"{where}: `{name}` must have shape {expected}, got {list(array.shape)}")
    if integer:
        if array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
            raise ValueError(f"{where}: `{name}` values do not fit in {np.dtype(dtype).name}")
        return array.astype(dtype)
    with np.errstate(over="ignore"):
        cast = array.astype(dtype)
    if not np.isfinite(cast).all():
        limit = f" (|value| <= {FLOAT16_MAX:g} for float16)" if dtype == np.float16 else ""
        raise ValueError(f"{where}: `{name}` must be finite{limit}, got NaN or infinite values")
    return cast


def load_region_store(path: str, require_concept_names: bool = False) -> tuple[datasets.Dataset, dict]:
    """All complete shards, memory-mapped and concatenated in shard order, and the sidecar metadata.

    Training needs the detector's concept names (they make the anchors): with `require_concept_names`, a
    store converted without them is refused with the way to fix it.
    """
    path = os.fspath(path)
    metadata = _read_metadata(path)
    if require_concept_names and metadata["concept_names"] is None:
        raise ValueError(f"the region store {path!r} has no concept names (converted without --concept_names): CMAL's "
                         "anchors need the detector's class names; convert it again with --concept_names FILE")  # fmt: skip
    names = _shard_dirs(path)
    shards = [datasets.load_from_disk(os.path.join(path, name)) for name in names]
    _check_shards(path, metadata, names, shards)
    if not shards:
        features = region_store_features(metadata["feature_dim"], metadata["num_soft_labels"])
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features), metadata
    return datasets.concatenate_datasets(shards), metadata


def _check_shards(path: str, metadata: dict, names: list[str], shards: list) -> None:
    """The shards agree with the sidecar and with each other: their feature width is the metadata's
    `feature_dim`, and no image id is in two places (a lookup by id would silently keep one)."""
    seen = {}
    for name, shard in zip(names, shards):
        width = getattr(shard.features.get("features"), "shape", (None, None))[1]
        if width is not None and width != metadata["feature_dim"]:
            raise ValueError(f"the region store {path!r}: shard {name} holds {width}-d features but its "
                             f"{METADATA_FILE} says feature_dim {metadata['feature_dim']}: the two were written by "
                             "different conversions; convert the store again")  # fmt: skip
        for row, image_id in enumerate(shard.data.table.column("image_id").to_pylist()):
            if image_id in seen:
                raise ValueError(f"the region store {path!r} holds image id {image_id!r} twice ({seen[image_id][0]}, "
                                 f"row {seen[image_id][1]} and {name}, row {row}): ids must be unique; was a shard "
                                 "copied in twice?")  # fmt: skip
            seen[image_id] = (name, row)


def row_to_regions(row: dict) -> dict:
    """One store row -> the precomputed-regions input of the CMAL image processor.

    Works on plain rows and on `with_format("numpy")` rows alike. Arrow keeps no width for an empty
    list, so a plain row of an image without regions gives features of shape [0, 0]; numpy-format
    rows keep [0, D].
    """
    regions = {
        "features": _matrix(_features(np.asarray(row["features"])), None),
        "boxes": np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
        "boxes_normalized": True,
        "concept_ids": np.asarray(row["concept_ids"], dtype=np.int64),
        "scores": np.asarray(row["scores"], dtype=np.float32),
    }
    if "soft_labels" in row:
        regions["soft_labels"] = _matrix(row["soft_labels"], np.float32)
    return regions


class ArrowRows:
    """Rows of a `datasets.Dataset`'s list columns as numpy views of its Arrow buffers (memory-mapped when the
    table is on disk): a few slices per row, where `datasets` formatting converted every value."""

    def __init__(self, dataset, names):
        table = dataset.data.table
        # a selected or shuffled dataset reads through its indices mapping
        self.indices = None if dataset._indices is None else dataset._indices.column(0).to_numpy().astype(np.int64)
        lengths = [len(chunk) for chunk in table.column(0).chunks]
        self.chunk_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # per column and chunk: (row offsets into regions, region offsets into values or None, flat values)
        self.columns = {name: [self._buffers(chunk) for chunk in table.column(name).chunks] for name in names}

    @staticmethod
    def _buffers(chunk):
        storage = getattr(chunk, "storage", chunk)  # datasets' Array2D extension: list<list<value>>
        rows = storage.offsets.to_numpy()
        if pa.types.is_list(storage.type.value_type):
            return rows, storage.values.offsets.to_numpy(), storage.values.values.to_numpy(zero_copy_only=False)
        return rows, None, storage.values.to_numpy(zero_copy_only=False)

    def _stored(self, rows) -> tuple[list[int], list[int]]:
        """(chunk, row inside it) of each of `rows`, through the indices mapping."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.indices is not None:
            rows = self.indices[rows]
        chunks = np.searchsorted(self.chunk_starts, rows, side="right") - 1
        return chunks.tolist(), (rows - self.chunk_starts[chunks]).tolist()


class RegionReader(ArrowRows):
    """Zero-copy reads of a region store: each image's arrays are numpy views into the store's memory-mapped
    Arrow buffers, so the processor's padded batch is the only copy a feature sees between disk and device.

    `datasets` formatting rows into numpy was most of the collator's time; an Arrow `take` still copied
    every feature and rebuilt the extension types. Here a read is a few slices per image (in the main
    process or a DataLoader worker alike: the buffers are file mappings, shared after fork).
    """

    COLUMNS = {"features": None, "boxes": np.float32, "concept_ids": np.int64, "scores": np.float32,
               "soft_labels": np.float32}  # None: float16 stays float16 (`_features`)  # fmt: skip

    def __init__(self, dataset):
        table = dataset.data.table
        names = [name for name in self.COLUMNS if name in table.column_names]
        super().__init__(dataset, names)
        self.widths = {name: getattr(table.column(name).type, "shape", (None, None))[1] for name in names}  # Array2D

    def __call__(self, rows, columns=None) -> list[dict]:
        """The regions of store rows, as `row_to_regions` gives them, in the given order (only `columns`, when
        given: the features alone are what the main process gathers)."""
        read = {name: buffers for name, buffers in self.columns.items() if columns is None or name in columns}
        regions = []
        for chunk, row in zip(*self._stored(rows)):
            region = {"boxes_normalized": True}
            for name, buffers in read.items():
                row_offsets, value_offsets, values = buffers[chunk]
                start, end = row_offsets[row], row_offsets[row + 1]
                if value_offsets is None:
                    region[name] = values[start:end].astype(self.COLUMNS[name], copy=False)
                    continue
                first, last = value_offsets[start], value_offsets[end]
                width = self.widths[name] or ((last - first) // (end - start) if end > start else 0)
                matrix = values[first:last].reshape(end - start, width)
                region[name] = _features(matrix) if self.COLUMNS[name] is None else matrix.astype(self.COLUMNS[name], copy=False)
            if "boxes" in region:
                region["boxes"] = region["boxes"].reshape(-1, 4)
            regions.append(region)
        return regions


def _features(array: np.ndarray) -> np.ndarray:
    """float16 features stay float16 (the processor and DataLoader move half the bytes; the model casts them
    on its device); other dtypes become float32."""
    return array if array.dtype in (np.float16, np.float32) else array.astype(np.float32)


def _matrix(value, dtype) -> np.ndarray:
    array = np.asarray(value, dtype=dtype)
    return array if array.ndim == 2 else array.reshape(0, 0)
