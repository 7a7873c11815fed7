"""Pre-training data: image-text pairs over a region store, a length-grouped sampler, and the collator
that makes the MLM / MRM / ITM targets (AMC targets are made inside the model by the anchor swap).

Every random choice of the collator is drawn from a generator seeded by (seed, epoch, example index),
so a batch is the same whoever builds it and whenever: a run resumed mid-epoch, or a run on another
number of processes, sees the same masks for the same examples.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import trainer_pt_utils

from cmal.processors.image_processing_cmal import all_finite

from .epochs import TrainingData
from .region_store import ArrowRows, RegionReader


WORD_COUNT_PART = 1_000_000  # captions per thread task of `ImageTextPairs.lengths`


def _word_counts(texts) -> np.ndarray:
    """Spaces + 1: a caption's words when single spaces separate them. Only which pairs batch together
    depends on it (the text is padded to its word pieces anyway), so irregular whitespace may overcount;
    Arrow's exact whitespace split took 3x as long (10M captions: 2.4 s vs 0.7-0.9 s on 2 cores)."""
    return pc.count_substring(texts, " ").to_numpy() + 1


def encode_captions(texts, processor, max_length: int, num_proc: int | None = None) -> datasets.Dataset:
    """Every caption's `processor.encode_texts` (int32 lists, row for row), computed once: `datasets` caches the
    table beside the captions' own files under a fingerprint of the captions, the tokenizer, the anchor lexicon and
    `max_length`, so a later run (or another process of this one, after the first) loads it instead."""

    def encode(batch: dict) -> dict:
        encoded = processor.encode_texts(batch["text"], max_length)
        return {key: [np.asarray(row, np.int32) for row in rows] for key, rows in encoded.items()}

    # the tokenizer's model, normalizer and splitters, not the truncation and padding a call leaves on it
    tokenizer = {key: value for key, value in json.loads(processor.tokenizer.backend_tokenizer.to_str()).items()
                 if key not in ("truncation", "padding")}  # fmt: skip
    fingerprint = datasets.fingerprint.Hasher.hash(
        [texts._fingerprint, tokenizer, processor.tokenizer.padding_side, processor.anchor_lexicon, max_length]
    )
    # record batches of 100,000 captions: 10M of them read in 100 chunks, not 10,000
    return texts.map(encode, batched=True, batch_size=1000, writer_batch_size=100_000, remove_columns=texts.column_names,
                     new_fingerprint=fingerprint, num_proc=num_proc, desc="Encoding the captions (once)")  # fmt: skip


class TextTokens(ArrowRows):
    """Zero-copy reads of `encode_captions` rows: each caption's lists as numpy views."""

    def __init__(self, tokens):
        super().__init__(tokens, tokens.column_names)

    def __call__(self, rows) -> list[dict]:
        read = []
        for chunk, row in zip(*self._stored(rows)):
            entry = {}
            for name, buffers in self.columns.items():
                row_offsets, _, values = buffers[chunk]
                entry[name] = values[row_offsets[row] : row_offsets[row + 1]]
            read.append(entry)
        return read


class ImageTextPairs(TrainingData, Dataset):
    """(text, regions of its image) pairs: a text table with `image_id`, `text` joined to a region store, and
    optionally its captions encoded once (`encode_captions`): items then carry their `tokens`."""

    def __init__(self, texts, regions, tokens=None):
        if tokens is not None and len(tokens) != len(texts):
            raise ValueError(f"`tokens` has {len(tokens)} rows for {len(texts)} texts: encode these texts (`encode_captions`)")
        self.tokens = None if tokens is None else TextTokens(tokens)
        self.texts = texts
        self.regions = regions.with_format("arrow")
        self.read_regions = RegionReader(regions)  # zero-copy views into the memory-mapped store
        # joined in Arrow (no Python loop over the captions: start-up must not grow with the corpus)
        text_ids = texts.with_format("arrow")["image_id"]
        rows = pc.index_in(text_ids, value_set=self.regions["image_id"].combine_chunks())
        if rows.null_count:
            missing = sorted(pc.unique(pc.filter(text_ids, pc.is_null(rows))).to_pylist())
            raise ValueError(f"{len(missing)} texts refer to images missing from the region store, e.g. {missing[:3]}")
        self.image_rows = rows.to_numpy()
        self.num_images = len(regions)

    def __len__(self):
        return len(self.texts)

    def lengths(self) -> np.ndarray:
        """Words (`_word_counts`) plus regions of each pair: what the batch is padded to, near enough to group by.

        Arrow's compute functions release the GIL, so parts of a million captions are counted in threads."""
        texts = self.texts.with_format("arrow")["text"]
        parts = [texts.slice(start, WORD_COUNT_PART) for start in range(0, len(texts), WORD_COUNT_PART)]
        with ThreadPoolExecutor(pa.cpu_count()) as pool:
            words = np.concatenate([np.zeros(0, dtype=np.int64), *pool.map(_word_counts, parts)])
        return words + self.num_regions()[self.image_rows]

    def num_regions(self) -> np.ndarray:
        """Regions of each image (by image row)."""
        return np.asarray(self.regions["num_regions"][:])  # one read; a Column read row by row formats each row

    def easy_pairs(self, quantile: float = 0.5) -> np.ndarray:
        """The pairs whose image has at most the `quantile` of the images' region counts: the small scenes a
        curriculum starts with (all pairs when every image has as many regions, as a fixed-K detector gives)."""
        counts = self.num_regions()[self.image_rows]
        return np.flatnonzero(counts <= np.quantile(counts, quantile))

    def regions_of_images(self, rows: list[int]) -> list[dict]:
        return self.read_regions(rows)

    def finish_batch(self, batch: dict, device=None) -> dict:
        """The model's inputs from a batch whose collator left the features to this process (`PretrainingCollator(...,
        features_in_main=True)`: numpy arrays, naming each slot's image and stored region in `image_rows` and
        `region_index`): the features gathered from this process's memory map of the store, every array a tensor,
        on `device` when given. A DataLoader worker then neither faults the store's pages in anew nor sends the
        padded features, or any tensor, through shared memory (a few small arrays are pickled instead)."""
        if "image_rows" not in batch:
            return batch
        rows, index = batch.pop("image_rows"), batch.pop("region_index")
        views = [region["features"] for region in self.read_regions(rows, columns=("features",))]
        shape = (*index.shape, views[0].shape[1])
        if torch.cuda.is_available():  # pinned, for an asynchronous copy: torch's host allocator caches these blocks
            features = torch.empty(shape, dtype=torch.from_numpy(views[0][:0].copy()).dtype, pin_memory=True)
            out = features.numpy()
        else:  # numpy's allocation: a fresh torch one faulted its pages in anew at every batch (1,500 faults)
            out = np.empty(shape, views[0].dtype)
            features = torch.from_numpy(out)
        counts = (index >= 0).sum(1).tolist()
        in_order = (index == np.arange(index.shape[1])).sum(1).tolist()  # slots that hold the stored region of their rank
        for b, (view, slots, count) in enumerate(zip(views, index, counts)):
            if in_order[b] == count == len(view):  # every region, in stored order: a plain copy
                out[b, :count] = view
            else:
                np.take(view, slots[:count], axis=0, out=out[b, :count], mode="clip")  # "raise" copies `out` first
            out[b, count:] = 0
            if not all_finite(out[b, :count]):  # image by image: a whole-batch check made 4.7 MB temporaries
                raise ValueError(f"the region store's features of image row {int(rows[b])} hold NaN or infinite values")
        batch = {key: torch.from_numpy(value) for key, value in batch.items()} | {"visual_feats": features}
        return batch if device is None else {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict]:
        """A batch's items with its texts read in one call (the DataLoader calls this for a whole batch;
        row by row, `datasets` formatting took a tenth of the pipeline's time)."""
        indices = [int(index) for index in indices]
        texts = self.texts[indices]["text"]
        items = [{"index": i, "epoch": self.epoch, "text": text, "image_row": int(self.image_rows[i])}
                 for i, text in zip(indices, texts)]  # fmt: skip
        if self.tokens is not None:
            for item, tokens in zip(items, self.tokens(indices)):
                item["tokens"] = tokens
        return items


def length_grouped_indices(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """transformers' `get_length_grouped_indices` in numpy, the same order (tested): its Python sort of every
    mega-batch took seconds per epoch at 10M captions."""
    count = len(lengths)
    size = max(min(count // (batch_size * 4), 50), 1) * batch_size  # its mega-batch
    indices = torch.randperm(count, generator=generator).numpy()
    # by mega-batch, then longest first; lexsort is stable, as `sorted` is, so ties keep the permutation's order
    indices = indices[np.lexsort((-lengths[indices], np.arange(count) // size))]
    starts = np.arange(0, count, size)
    longest = starts[np.argmax(lengths[indices[starts]])]  # the longest example first: an OOM shows at once
    indices[[0, longest]] = indices[[longest, 0]]
    return indices


class LengthGroupedSampler(trainer_pt_utils.LengthGroupedSampler):
    """transformers' length-grouped sampler (shuffle, then sort runs of up to 50 batches by length, so
    batches pad little), with an order that depends only on (seed, epoch), computed in numpy.

    transformers' sampler draws from its generator as it finds it, so its order would depend on how often
    it was iterated before. Here each iteration reseeds it from seed + epoch (the rule of Accelerate's
    seedable sampler): every process draws the same order, and a resumed run the one the killed run saw.
    The training loop's `set_epoch` (through Accelerate) shuffles each epoch anew.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, easy=None, easy_epochs: int = 0):
        super().__init__(batch_size, lengths=np.asarray(lengths), generator=torch.Generator())
        self.seed, self.epoch = seed, 0
        self.easy = np.asarray([] if easy is None else easy, dtype=np.int64)
        self.easy_epochs = easy_epochs if len(self.easy) else 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        """A curriculum's first `easy_epochs` are as long as any other, drawn (with repeats) from `easy` only."""
        self.generator.manual_seed(self.seed + self.epoch)
        if self.epoch < self.easy_epochs:
            picks = torch.randint(len(self.easy), (len(self.lengths),), generator=self.generator)
            return iter(self.easy[picks.numpy()].tolist())
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.generator).tolist())


class StreamingPairs(TrainingData, IterableDataset):
    """`ImageTextPairs` read as shards in order, for corpora too large to read at random (regions on network or
    spinning storage): each process and each of its DataLoader workers reads only its own shards.

    Shard s is the s-th contiguous run of caption rows (a store lists an image's captions together, so a
    shard reads a contiguous part of the region store). Shard s belongs to reader s % R of the R = processes
    x workers readers, every epoch, so every example is read once per epoch and each reader keeps to its part
    of the corpus. Each epoch shuffles the order of a reader's shards and of the rows inside each shard by
    (seed, epoch, shard). A reader yields batches (lists of items, for the collator; the DataLoader takes
    `batch_size=None`), its last one possibly short. The stream is a function of (seed, epoch), so a resumed
    run skips the batches it had trained on and reads on exactly where the killed run was.
    """

    streamed = True

    def __init__(self, pairs: ImageTextPairs, batch_size: int, num_shards: int, process_index: int = 0,
                 num_processes: int = 1, num_workers: int = 0, seed: int = 0):  # fmt: skip
        self.process_index, self.workers = process_index, max(num_workers, 1)  # no workers: the process reads
        self.readers = num_processes * self.workers
        if num_shards < self.readers:
            raise ValueError(f"--streaming_shards {num_shards} is fewer than the {self.readers} readers "
                             f"({num_processes} processes x {self.workers} workers): some would read nothing")  # fmt: skip
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.bounds = np.linspace(0, len(pairs), num_shards + 1).round().astype(np.int64)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self.pairs.set_epoch(epoch)  # its items carry the epoch to the collator

    def finish_batch(self, batch: dict, device=None) -> dict:
        return self.pairs.finish_batch(batch, device)

    def num_examples(self) -> int:
        return len(self.pairs)

    def batches_per_epoch(self, loader) -> int:
        return self.batches_all_processes()

    def _batches_of(self, reader: int) -> int:
        sizes = np.diff(self.bounds)[reader :: self.readers]
        return int(np.ceil(sizes.sum() / self.batch_size))

    def __len__(self):
        """Batches this process yields per epoch (the same every epoch)."""
        first = self.process_index * self.workers
        return sum(self._batches_of(reader) for reader in range(first, first + self.workers))

    def batches_all_processes(self) -> int:
        """Batches of one epoch over every process: what sizes the schedule, the same on every process."""
        return sum(self._batches_of(reader) for reader in range(self.readers))

    def __iter__(self):
        worker = get_worker_info()
        reader = self.process_index * self.workers + (worker.id if worker is not None else 0)
        shards = np.arange(reader, len(self.bounds) - 1, self.readers)
        order = np.random.default_rng([self.seed, self.epoch, reader]).permutation(shards)
        rows = np.concatenate([self.bounds[s] + np.random.default_rng([self.seed, self.epoch, s]).permutation(
            self.bounds[s + 1] - self.bounds[s]) for s in order])  # fmt: skip
        for start in range(0, len(rows), self.batch_size):
            yield self.pairs.__getitems__(rows[start : start + self.batch_size])


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one example's random choices: `np.random.default_rng([seed, epoch, index])`, built without
    its argument checks (a quarter of its 14 us, once per example per epoch)."""
    return np.random.Generator(np.random.PCG64([seed, epoch, index]))


def other_image(image_row: int, num_images: int, rng: np.random.Generator) -> int:
    """Any image row but `image_row`, uniformly (at least two images)."""
    return (image_row + 1 + int(rng.integers(num_images - 1))) % num_images


class NegativeImages:
    """Draws an ITM negative for an image: another one among the `window` images nearest it in region count
    (0, or a window of every image: any other image, `other_image`; no order by region count is built then)."""

    def __init__(self, num_regions: np.ndarray, window: int = 0):
        self.num_images = len(num_regions)
        self.window = self.num_images if window == 0 else min(window + 1, self.num_images)  # with the image itself
        if self.window < self.num_images:
            self.by_regions = np.argsort(num_regions, kind="stable")
            self.place = np.empty(self.num_images, dtype=np.int64)
            self.place[self.by_regions] = np.arange(self.num_images)

    def __call__(self, image_row: int, rng: np.random.Generator) -> int:
        if self.window == self.num_images:
            return other_image(image_row, self.num_images, rng)
        place = self.place[image_row]
        start = min(max(place - self.window // 2, 0), self.num_images - self.window)
        other = start + int(rng.integers(self.window - 1))
        return int(self.by_regions[other + (other >= place)])


class MatchingPairs:
    """The image each ITM example is shown with: its own (label 1) or, with probability `negative_probability`,
    a negative (label 0), drawn from the example's generator so a pair is a function of (seed, epoch, index).

    A negative is, with probability `twin_probability`, one of the image's contrast twins (`twins(image_row)`:
    images that a rule reading region count and tags cannot tell from it, as the synthetic world makes) of
    which the text is not true; else another image (`NegativeImages`), drawn again (up to 10 times) while
    `true_of(text, image_row)` says the text also holds of it, where the corpus knows."""

    def __init__(self, num_regions: np.ndarray, negative_probability: float = 0.5, true_of=None,
                 negative_window: int = 0, twins=None, twin_probability: float = 1.0):  # fmt: skip
        self.num_images = len(num_regions)
        self.negative_probability, self.true_of = negative_probability, true_of
        self.twins, self.twin_probability = twins, twin_probability
        self.negative_image = NegativeImages(num_regions, negative_window)

    def __call__(self, item: dict, rng: np.random.Generator, use_twins: bool = True) -> tuple[int, int]:
        """(image row, ITM label) of one `ImageTextPairs` item; `use_twins=False` draws no twin."""
        own = item["image_row"]
        if self.num_images < 2 or rng.random() >= self.negative_probability:
            return own, 1
        twins = self.twins(own) if self.twins is not None and use_twins else []
        if twins and rng.random() < self.twin_probability:
            for row in rng.permutation(twins).tolist():
                if self.true_of is None or not self.true_of(item["text"], row):
                    return row, 0
        row = own
        for _ in range(10):
            row = self.negative_image(own, rng)
            if self.true_of is None or not self.true_of(item["text"], row):
                break
        return row, int(row == own)

    def pairs(self, dataset: "ImageTextPairs", seed: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(image rows, labels) of every item of `dataset`, as `PretrainingCollator(seed=seed)` pairs them in
        `epoch`: what a rule is scored on next to the model (`benchmarks/floors.py`)."""
        paired = [self(item, example_rng(seed, epoch, item["index"]))
                  for item in dataset.__getitems__(range(len(dataset)))]  # fmt: skip
        return np.array([row for row, _ in paired]), np.array([label for _, label in paired])


class PretrainingCollator:
    """Batch of `ImageTextPairs` items -> the inputs and targets of `CMALForPreTraining`.

    * ITM: `MatchingPairs` pairs an example with its image or a negative (`itm_labels` 0), with
      probability `itm_negative_probability`; contrast twins only from epoch `twins_from_epoch` on (matching
      learns to count before it learns to bind: twins from the start kept ITM at chance, measured). With
      `negative_window` W, a negative that is not a twin is one of the W images nearest in region count: a
      batch the sampler grouped by length keeps its length (a random image would pad it to the largest
      scenes, and region count would tell the mismatch). 0 draws from all images.
    * One modality at a time: each matched pair is either an MLM example (whole words that are not
      anchors are masked with probability `mlm_probability`; 80% [MASK], 10% random, 10% kept) or an
      MRM example (each real region is masked with probability `mrm_probability`). Mismatched pairs
      stay unmasked: they serve ITM only, which the model computes on a clean pass (UNITER), so no
      masking can reveal the ITM label.
    * Anchors keep their words and regions visible here: the model masks and swaps them itself.
    * `features_in_main`: the batch (numpy arrays) names each region slot's image and stored region (`image_rows`,
      `region_index`) instead of carrying `visual_feats`, which the main process gathers from its own memory map
      (`ImageTextPairs.finish_batch`, called by the training loop): the same batch, without the worker touching a
      feature or sending a tensor.
    """

    def __init__(
        self,
        processor,
        dataset: ImageTextPairs,
        mlm_probability: float = 0.15,
        mrm_probability: float = 0.15,
        itm_negative_probability: float = 0.5,
        max_length: int = 40,
        seed: int = 0,
        true_of=None,
        negative_window: int = 0,
        twins=None,
        twin_probability: float = 1.0,
        twins_from_epoch: int = 0,
        features_in_main: bool = False,
    ):
        self.processor = processor
        self.features_in_main = features_in_main
        self.dataset = dataset
        self.mlm_probability = mlm_probability
        self.mrm_probability = mrm_probability
        self.max_length = max_length
        self.seed = seed
        tokenizer = processor.tokenizer
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.matching = MatchingPairs(dataset.num_regions(), itm_negative_probability, true_of, negative_window,
                                      twins, twin_probability)  # fmt: skip
        self.twins_from_epoch = twins_from_epoch

    def __call__(self, items: list[dict]) -> dict:
        rngs = [example_rng(self.seed, item["epoch"], item["index"]) for item in items]
        image_rows, itm_labels = map(list, zip(*(self.matching(item, rng, item["epoch"] >= self.twins_from_epoch)
                                                 for item, rng in zip(items, rngs))))  # fmt: skip
        regions = self.dataset.regions_of_images(image_rows)
        if self.features_in_main:  # each region's "feature" is its stored index: the processor pads and orders them
            regions = [{**region, "features": np.arange(len(region["boxes"]), dtype=np.float32)[:, None]} for region in regions]
        if "tokens" in items[0]:  # encoded once (`encode_captions`): padded here, as the processor pads
            batch = self.processor.pad_texts([item["tokens"] for item in items], return_word_ids=True)
            if batch["input_ids"].shape[1] > self.max_length:
                raise ValueError(f"captions encoded with more than the collator's max_length ({batch['input_ids'].shape[1]} > "
                                 f"{self.max_length} tokens): encode them with max_length={self.max_length}")  # fmt: skip
            batch |= self.processor.image_processor(regions=regions, return_tensors="np")
        else:
            batch = dict(self.processor(text=[item["text"] for item in items], regions=regions, max_length=self.max_length,
                                        return_word_ids=True, return_tensors="np"))  # fmt: skip
        if self.features_in_main:
            slots = batch.pop("visual_feats")[..., 0].astype(np.int64)
            slots[batch["visual_attention_mask"] == 0] = -1
            batch["image_rows"], batch["region_index"] = np.asarray(image_rows, dtype=np.int64), slots
        word_ids = batch.pop("word_ids")
        input_ids = batch["input_ids"]
        labels = np.full_like(input_ids, -100)
        masked_regions = np.zeros(batch["visual_attention_mask"].shape, dtype=bool)
        for b, rng in enumerate(rngs):
            if not itm_labels[b]:
                continue
            if rng.random() < 0.5:
                self._mask_words(b, rng, input_ids, labels, word_ids, batch["token_concept_ids"])
            else:
                real = batch["visual_attention_mask"][b].astype(bool)
                chosen = (rng.random(len(real)) < self.mrm_probability) & real
                if real.any() and not chosen.any():
                    chosen[rng.choice(np.flatnonzero(real))] = True
                masked_regions[b] = chosen
        batch |= {"labels": labels, "masked_regions": masked_regions, "itm_labels": np.asarray(itm_labels, dtype=np.int64)}
        # numpy arrays pickle by value: from a worker, a tensor would cross in fresh shared memory
        return batch if self.features_in_main else {key: torch.from_numpy(value) for key, value in batch.items()}

    def _mask_words(self, b, rng, input_ids, labels, word_ids, token_concept_ids):
        """Whole-word masking of example `b`'s words that are not anchors (in Python lists: a sentence's few
        dozen tokens took numpy's per-call overhead in `unique` and `isin` at every example)."""
        words = word_ids[b].tolist()
        anchor_words = {word for word, concept in zip(words, token_concept_ids[b].tolist()) if concept >= 0}
        candidates = sorted({word for word in words if word >= 0} - anchor_words)
        if not candidates:
            return
        chosen = {w for w in candidates if rng.random() < self.mlm_probability} or {candidates[int(rng.integers(len(candidates)))]}
        for position, word in enumerate(words):
            if word not in chosen:
                continue
            labels[b, position] = input_ids[b, position]
            draw = rng.random()
            if draw < 0.8:
                input_ids[b, position] = self.mask_id
            elif draw < 0.9:
                input_ids[b, position] = int(rng.integers(self.vocab_size))
