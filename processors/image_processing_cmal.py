# Copyright 2026 The CMAL authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image processor for CMAL: precomputed regions -> padded region inputs, raw images -> detector pixels.

Ships as Hub remote code: it imports numpy, PIL, torch and transformers only. It keeps its own
`__init__` and `preprocess` (rather than a transformers image-processing backend) so that it
behaves the same on every transformers 5.x release.
"""

import base64
import binascii
import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


def _to_numpy(value, name: str, index: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bfloat16
    try:
        return np.asarray(value)
    except Exception as error:  # noqa: BLE001 - re-raised with the argument's name
        raise ValueError(f"`regions[{index}]['{name}']` must be array-like, got {type(value).__name__}") from error


def all_finite(array: np.ndarray) -> bool:
    """`np.isfinite(array).all()`; for float16 from the bits, since numpy's float16 `isfinite` works element by
    element in software: without the sign, a finite value's bits are below 0x7C00 (exponent all ones: inf or
    NaN). 90 us for 36 x 2048 features, 8 this way (12 comparing the exponent to all ones)."""
    if array.dtype == np.float16:
        return array.size == 0 or bool((array.view(np.uint16) & 0x7FFF).max() < 0x7C00)
    return bool(np.isfinite(array).all())


# 8000 x 8000: above any camera's default output, far below what a few-KB decompression bomb can claim
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def boxes_to_visual_pos(boxes: np.ndarray, visual_pos_dim: int = 7) -> np.ndarray:
    """Normalised `(x1, y1, x2, y2)` -> `(x1, y1, x2, y2, w, h, area)`, cut to `visual_pos_dim` (4, 6 or 7).

    The same formula as `modeling_cmal.boxes_to_visual_pos`, which the detector path uses; the
    region-parity tests check that the two agree.
    """
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    full = np.concatenate([boxes, width[..., None], height[..., None], (width * height)[..., None]], axis=-1)
    return full[..., :visual_pos_dim]


class CMALImageProcessor(BaseImageProcessor):
    r"""
    Prepares the visual inputs of a CMAL model, from either of two sources.

    * `regions`: precomputed detections, one dict per image with `features` `[N, D]`, `boxes` `[N, 4]`
      (`x1, y1, x2, y2`; absolute pixels with `image_size=(width, height)`, or normalised with
      `boxes_normalized=True`), `tags` (concept names or ids) or `concept_ids`, and optional
      `scores` `[N]` and `soft_labels` `[N, C]`. The top `max_regions` by score are kept (in
      descending score order, as the detector path orders them) and padded across the batch into
      `visual_feats`, `visual_pos`, `visual_attention_mask`, `region_concept_ids`, `region_scores`
      (and `region_soft_labels`).
    * `images`: raw images (PIL, numpy `HWC`/`CHW`, torch `CHW`, or file paths; RGB, RGBA, LA, L, P,
      CMYK, 16-bit; the EXIF orientation is applied) turned into the detector's `pixel_values`:
      resized to a fixed `size` (a fixed size keeps every image independent of its batch),
      rescaled, optionally normalised.

    Args:
        concept_names (`list[str]`, *optional*): the concept vocabulary, to map tag names to ids.
        max_regions (`int`, defaults to 100): most regions kept per image.
        visual_pos_dim (`int`, defaults to 7): 4, 6 or 7 box values per region.
        size (`dict`, defaults to `{"height": 640, "width": 640}`): detector input size (RT-DETR's).
        do_rescale, rescale_factor: multiply pixel values by `rescale_factor` (1/255).
        do_normalize, image_mean, image_std: normalise pixels per channel (RT-DETR does not).
        max_image_pixels (`int`, defaults to 64,000,000): larger images (width x height, read from the
            file's header) are refused before they are decoded; a few-KB PNG can claim gigabytes.
            `None` for no limit.
    """

    model_input_names = [
        "pixel_values",
        "visual_feats",
        "visual_pos",
        "visual_attention_mask",
        "region_concept_ids",
        "region_scores",
    ]

    def __init__(
        self,
        concept_names: list[str] | None = None,
        max_regions: int = 100,
        visual_pos_dim: int = 7,
        size: dict | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if visual_pos_dim not in (4, 6, 7):
            raise ValueError(f"`visual_pos_dim` must be 4, 6 or 7, got {visual_pos_dim}")
        size = dict(size) if size is not None else {"height": 640, "width": 640}
        if set(size) != {"height", "width"} or min(size.values()) < 1:
            raise ValueError(f"`size` must be {{'height': H, 'width': W}} with positive sizes, got {size}")
        self.concept_names = list(concept_names) if concept_names is not None else None
        self.max_regions = max_regions
        self.visual_pos_dim = visual_pos_dim
        self.size = size
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else [0.485, 0.456, 0.406]
        self.image_std = list(image_std) if image_std is not None else [0.229, 0.224, 0.225]
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
                                             or max_image_pixels < 1):  # fmt: skip
            raise ValueError(f"`max_image_pixels` must be a positive integer or None, got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_detector_processor(cls, processor, **kwargs) -> "CMALImageProcessor":
        """The raw-image settings of a detector's own image processor (size, rescaling, normalisation), so the
        detector inside a CMAL model sees the pixels it was trained on; `kwargs` set the rest or override them
        (a smaller `size` for a faster detector)."""
        size = processor.size  # a dict, or (newer transformers) a SizeDict with every field, unused ones None
        height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
        if height is None or width is None:
            raise ValueError(f"the detector's processor resizes to {size}; a fixed {{'height', 'width'}} size is needed")
        settings = {name: getattr(processor, name) for name in ("do_rescale", "rescale_factor", "do_normalize")}
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        settings |= dict(size={"height": height, "width": width}, image_mean=None if mean is None else list(mean),
                         image_std=None if std is None else list(std))  # fmt: skip
        return cls(**{**settings, **kwargs})

    def __call__(self, images=None, regions=None, **kwargs) -> BatchFeature:
        return self.preprocess(images=images, regions=regions, **kwargs)

    def preprocess(self, images=None, regions=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Process `images` (raw) or `regions` (precomputed), a single one or a list."""
        if (images is None) == (regions is None):
            raise ValueError("Pass exactly one of `images` (raw images) or `regions` (precomputed detections)")
        unknown = sorted(kwargs)
        if unknown:
            raise ValueError(f"CMALImageProcessor got unexpected arguments {unknown}")
        if regions is not None:
            data = self._process_regions([regions] if isinstance(regions, dict) else list(regions))
        else:
            batch = list(images) if isinstance(images, (list, tuple)) else [images]
            if not batch:
                raise ValueError("`images` is an empty list: pass at least one image")
            data = {"pixel_values": np.stack([self._process_image(image, i) for i, image in enumerate(batch)])}
        return BatchFeature(data=data, tensor_type=return_tensors)

    # -- raw images ---------------------------------------------------------------------------

    def open_image(self, image, name: str = "`image`", timeout: float | None = None):
        """A path, URL, `data:` URL, bytes or PIL image -> a decoded PIL image whose size was checked against
        `max_image_pixels` before its pixels were; arrays and tensors pass through unchanged. Every file that is
        not a whole image of a safe size is a `ValueError` naming `name`."""
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if path.startswith(("http://", "https://")):
                import httpx

                image = httpx.get(path, timeout=timeout, follow_redirects=True).content
            elif path.startswith("data:"):
                try:
                    image = base64.b64decode(path.split(",", 1)[-1], validate=True)
                except binascii.Error as error:
                    raise ValueError(f"{name} is a `data:` URL whose base64 is invalid ({error})") from None
            elif not os.path.isfile(path):
                raise ValueError(f"{name} is a path to no file: {path!r}")
            else:
                image = path
        if isinstance(image, (bytes, str)):
            if isinstance(image, str):
                with open(image, "rb") as file:
                    head, source = file.read(16), image
            else:
                head, source = image[:16], io.BytesIO(image)
            if not head:
                raise ValueError(f"{name} is an empty file (0 bytes), not an image")
            try:
                with warnings.catch_warnings():  # above Pillow's warning size: `max_image_pixels` decides below
                    warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                    image = PIL.Image.open(source)
            except PIL.Image.DecompressionBombError as error:
                raise ValueError(f"{name} is too large to decode safely ({error}); the limit is `max_image_pixels` = "
                                 f"{self.max_image_pixels}") from None  # fmt: skip
            except PIL.UnidentifiedImageError:
                raise ValueError(f"{name} is not an image Pillow can read: no image format starts with {head!r}") from None
            except (OSError, SyntaxError, EOFError) as error:
                raise ValueError(f"{name} is not an image Pillow can read ({error})") from None
        if isinstance(image, PIL.Image.Image) and min(image.size) < 1:
            raise ValueError(f"{name} is empty ({image.width}x{image.height} pixels)")
        if isinstance(image, PIL.Image.Image) and self.max_image_pixels and image.width * image.height > self.max_image_pixels:
            raise ValueError(
                f"{name} is {image.width}x{image.height} = {image.width * image.height / 1e6:.1f} megapixels, above the "
                f"image processor's `max_image_pixels` ({self.max_image_pixels / 1e6:g} MP): refused before decoding. "
                "Downscale it, or raise `max_image_pixels` if you trust the file"
            )
        if isinstance(image, PIL.Image.Image):
            try:  # Pillow decodes lazily: a truncated or corrupt file fails here, named, not deep in a transform
                image.load()
            except (OSError, SyntaxError, EOFError) as error:
                raise ValueError(f"{name} is truncated or corrupt: Pillow read its header but not its pixels ({error})") from None
        return image

    def _to_rgb_pil(self, image, index: int) -> PIL.Image.Image:
        """Any supported image -> an 8-bit RGB PIL image, upright by its EXIF orientation."""
        image = self.open_image(image, f"`images[{index}]`")
        if isinstance(image, PIL.Image.Image):
            image = PIL.ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                # 16-bit modes span 0..65535; 32-bit "I"/"F" images carry whichever range they were saved in.
                peak = 65535.0 if image.mode.startswith("I;16") else float(array.max()) if array.size else 1.0
                scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
                return self._array_to_pil(np.clip(array / scale, 0.0, 1.0), index)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return PIL.Image.alpha_composite(background, rgba).convert("RGB")  # transparent -> white
            return image.convert("RGB")
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(
                f"`images[{index}]` must be a PIL image, numpy array, torch tensor or file path, got {type(image).__name__}"
            )
        return self._array_to_pil(image, index)

    @staticmethod
    def _array_to_pil(array: np.ndarray, index: int) -> PIL.Image.Image:
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"`images[{index}]` must have 2 or 3 dimensions (HW, HWC or CHW), got shape {array.shape}")
        if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"`images[{index}]` must have 1, 3 or 4 channels, got shape {array.shape}")
        if 0 in array.shape:
            raise ValueError(f"`images[{index}]` is empty, got shape {array.shape}")
        if array.dtype == np.uint8:
            unit = array.astype(np.float64) / 255.0
        elif array.dtype == np.uint16:
            unit = array.astype(np.float64) / 65535.0
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise ValueError(f"`images[{index}]` has NaN or inf pixel values")
            unit = np.clip(array.astype(np.float64), 0.0, 1.0)  # float images are taken to be in [0, 1]
        else:
            raise ValueError(f"`images[{index}]` must be uint8, uint16 or float, got dtype {array.dtype}")
        if unit.shape[-1] == 4:  # composite onto white, like transparent PIL images
            unit = unit[..., :3] * unit[..., 3:] + (1.0 - unit[..., 3:])
        elif unit.shape[-1] == 1:
            unit = np.repeat(unit, 3, axis=-1)
        return PIL.Image.fromarray(np.round(unit * 255.0).astype(np.uint8), mode="RGB")

    def _process_image(self, image, index: int) -> np.ndarray:
        pil = self._to_rgb_pil(image, index).resize((self.size["width"], self.size["height"]), resample=PIL.Image.Resampling.BILINEAR)
        pixels = np.asarray(pil, dtype=np.float32)
        if self.do_rescale:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1)

    # -- precomputed regions -------------------------------------------------------------------

    def _concept_ids(self, region: dict, count: int, index: int) -> np.ndarray:
        tags = region.get("concept_ids", region.get("tags"))
        if tags is None:
            return np.full(count, -1, dtype=np.int64)
        if not (isinstance(tags, np.ndarray) and tags.dtype.kind in "iu"):  # integer ids as stored: no list
            tags = list(tags.tolist() if hasattr(tags, "tolist") else tags)
        if len(tags) != count:
            raise ValueError(f"`regions[{index}]` has {count} boxes but {len(tags)} tags")
        if all(isinstance(tag, str) for tag in tags):
            if self.concept_names is None:
                raise ValueError("tag names need `concept_names` in the image processor; pass concept ids instead")
            lookup = {name: i for i, name in enumerate(self.concept_names)}
            unknown = sorted({tag for tag in tags if tag not in lookup})
            if unknown:
                raise ValueError(f"`regions[{index}]` has tags that are not concept names: {unknown[:5]}")
            return np.asarray([lookup[tag] for tag in tags], dtype=np.int64)
        ids = np.asarray(tags)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"`regions[{index}]` tags must be concept names or integer ids, got {ids.dtype}")
        return ids.astype(np.int64)  # their range is checked over the batch (`_process_regions`)

    def _box_unit(self, region: dict, index: int) -> tuple[float, float, float, float]:
        """What an image's boxes are divided by to be normalised: its size for pixel boxes, 1 for normalised ones."""
        if region.get("image_size") is not None:
            width, height = (float(v) for v in region["image_size"])
            if width <= 0 or height <= 0:
                raise ValueError(f"`regions[{index}]['image_size']` must be (width, height) > 0, got {region['image_size']}")
            return width, height, width, height
        if not region.get("boxes_normalized", False):
            raise ValueError(
                f"`regions[{index}]` boxes need a unit: pass `image_size=(width, height)` for pixel boxes "
                "or `boxes_normalized=True` for boxes in [0, 1]"
            )
        return 1.0, 1.0, 1.0, 1.0

    def _process_regions(self, regions: Sequence[dict]) -> dict:
        """Each image's structure (types, keys, shapes, box unit, tags) is checked image by image; its values (finite
        boxes and scores, boxes inside the image and ordered) once over the whole batch, naming the first image at
        fault: image by image, numpy's per-call overhead cost more than the arithmetic (40 us an image)."""
        if not regions:
            raise ValueError("`regions` is an empty list: pass one dict per image")
        features, boxes, scores, soft, concept_ids, units, feature_dim, soft_dim = [], [], [], [], [], [], None, None
        for index, region in enumerate(regions):
            if not isinstance(region, dict):
                raise ValueError(f"`regions[{index}]` must be a dict, got {type(region).__name__}")
            for key in ("features", "boxes"):
                if key not in region:
                    raise ValueError(f"`regions[{index}]` needs '{key}', got keys {sorted(region)}")
            feature = _to_numpy(region["features"], "features", index)
            if feature.dtype not in (np.float16, np.float32):
                feature = feature.astype(np.float32)
            box = _to_numpy(region["boxes"], "boxes", index).astype(np.float64)
            if feature.ndim != 2:
                raise ValueError(f"`regions[{index}]['features']` must have shape (N, D), got {feature.shape}")
            count = feature.shape[0]
            if box.shape != (count, 4):
                raise ValueError(f"`regions[{index}]['boxes']` must have shape ({count}, 4), got {box.shape}")
            if feature_dim is not None and feature.shape[1] != feature_dim:
                raise ValueError(f"`regions[{index}]['features']` has dimension {feature.shape[1]}, earlier images {feature_dim}")
            feature_dim = feature.shape[1]
            if not all_finite(feature):  # image by image: a batch of features at once made batch-sized temporaries
                raise ValueError(f"`regions[{index}]['features']` must be finite, got NaN or inf")
            score = region.get("scores")
            score = np.ones(count) if score is None else _to_numpy(score, "scores", index).astype(np.float64)
            if score.shape != (count,):
                raise ValueError(f"`regions[{index}]['scores']` must be {count} finite numbers, got shape {score.shape}")
            labels = region.get("soft_labels")
            if labels is not None:
                labels = _to_numpy(labels, "soft_labels", index).astype(np.float32)
                if labels.ndim != 2 or labels.shape[0] != count or (soft_dim is not None and labels.shape[1] != soft_dim):
                    raise ValueError(f"`regions[{index}]['soft_labels']` must have shape ({count}, C), got {labels.shape}")
                soft_dim = labels.shape[1]
            units.append(self._box_unit(region, index))
            concept_ids.append(self._concept_ids(region, count, index))
            features.append(feature), boxes.append(box), scores.append(score), soft.append(labels)
        if soft_dim is not None and any(labels is None for labels in soft):
            raise ValueError("`soft_labels` must be given for every image of the batch or for none")

        counts = np.array([len(score) for score in scores])
        image = np.repeat(np.arange(len(regions)), counts)  # each region's image
        starts = np.cumsum(counts) - counts
        all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)

        def first_image(bad: np.ndarray) -> int:
            return int(image[np.flatnonzero(bad)[0]])

        all_ids = np.concatenate(concept_ids)
        limit = len(self.concept_names) if self.concept_names is not None else None
        unknown_ids = (all_ids < -1) | (all_ids >= limit if limit is not None else False)
        if unknown_ids.any():
            index = first_image(unknown_ids)
            own = concept_ids[index]
            raise ValueError(f"`regions[{index}]` concept ids must be -1 or lie in [0, {limit}), got range [{own.min()}, {own.max()}]")
        if not np.isfinite(all_boxes).all():
            raise ValueError(f"`regions[{first_image(~np.isfinite(all_boxes).all(1))}]['boxes']` must be finite, got NaN or inf")
        if not np.isfinite(all_scores).all():
            index = first_image(~np.isfinite(all_scores))
            raise ValueError(f"`regions[{index}]['scores']` must be {counts[index]} finite numbers, got shape ({counts[index]},)")
        normalised = all_boxes / np.repeat(np.asarray(units), counts, axis=0)
        tolerance = 1e-3  # detector boxes may overshoot the border by rounding
        outside = ((normalised < -tolerance) | (normalised > 1 + tolerance)).any(1)
        if outside.any():
            index = first_image(outside)
            own = normalised[image == index]
            raise ValueError(
                f"`regions[{index}]` boxes must lie in the image, got normalised range [{own.min():.4g}, {own.max():.4g}]"
            )
        reversed_ = (normalised[:, 2] < normalised[:, 0]) | (normalised[:, 3] < normalised[:, 1])
        if reversed_.any():
            raise ValueError(f"`regions[{first_image(reversed_)}]` boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")

        # each image's regions by descending score (ties in stored order), its top `max_regions` kept
        order = np.lexsort((-all_scores, image))
        rank = np.arange(len(order)) - np.repeat(starts, counts)
        kept, rank = order[rank < self.max_regions], rank[rank < self.max_regions]
        where = (image[kept], rank)
        batch, longest = len(regions), int(np.minimum(counts, self.max_regions).max())
        data = {
            # float16 features stay float16 (bottom-up-attention stores keep them so): half the bytes through
            # DataLoader workers and to the device, where the model casts them to its dtype
            "visual_feats": np.zeros((batch, longest, feature_dim), np.result_type(*(feature.dtype for feature in features))),
            "visual_pos": np.zeros((batch, longest, self.visual_pos_dim), np.float32),
            "visual_attention_mask": np.zeros((batch, longest), np.int64),
            "region_concept_ids": np.full((batch, longest), -1, np.int64),
            "region_scores": np.zeros((batch, longest), np.float32),
        }
        clipped = np.minimum(np.maximum(normalised[kept], 0.0), 1.0)  # `np.clip`, without its error-state context
        data["visual_pos"][where] = boxes_to_visual_pos(clipped, self.visual_pos_dim)
        data["visual_attention_mask"][where] = 1
        data["region_concept_ids"][where] = all_ids[kept]
        data["region_scores"][where] = all_scores[kept]
        if soft_dim is not None:
            data["region_soft_labels"] = np.zeros((batch, longest, soft_dim), np.float32)
            data["region_soft_labels"][where] = np.concatenate(soft)[kept]
        shown = np.minimum(counts, self.max_regions)  # kept regions of each image, contiguous in `kept`
        for b, (feature, first, count) in enumerate(zip(features, np.cumsum(shown) - shown, shown)):
            data["visual_feats"][b, :count] = feature[kept[first : first + count] - starts[b]]
        return data


CMALImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CMALImageProcessor", "all_finite", "boxes_to_visual_pos"]
