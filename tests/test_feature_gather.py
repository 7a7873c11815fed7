"""Pre-training's feature gather (`PretrainingCollator(features_in_main=True)` + `ImageTextPairs.finish_batch`): DataLoader
workers make everything but the region features, the main process gathers those from its own memory map; the batches
are exactly those the collator made with the features itself, in process and through workers, map-style and streamed."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor
from cmal.processors.image_processing_cmal import all_finite
from cmal.training.data.pretraining import ImageTextPairs, PretrainingCollator, StreamingPairs, encode_captions
from cmal.training.data.region_store import RegionStoreWriter, load_region_store
from cmal.training.data.tokenizer import build_word_tokenizer


NAMES = ["dog", "cat", "ball"]


@pytest.fixture(scope="module")
def pairs_and_processor(tmp_path_factory):
    """30 images of 1-12 regions (fp16 features, scores in no order) and two captions each; the processor keeps 8
    regions by score, so some images are cut and every image's regions are reordered."""
    root, rng = tmp_path_factory.mktemp("gather"), np.random.default_rng(0)
    with RegionStoreWriter(str(root / "regions"), 24, NAMES, source="test", shard_size=7) as writer:
        for i in range(30):
            n = int(rng.integers(1, 13))
            corner = rng.uniform(0, 0.5, (n, 2))
            writer.add(dict(image_id=f"img{i}", image_width=64, image_height=48, boxes=np.concatenate([corner, corner + 0.3], 1),
                            features=rng.standard_normal((n, 24)).astype(np.float16), concept_ids=rng.integers(0, 3, n),
                            scores=rng.uniform(0.1, 1, n)))  # fmt: skip
    texts = [f"a {NAMES[i % 3]} and a {NAMES[k]} here" for i in range(30) for k in (0, 2)]
    captions = Dataset.from_dict({"image_id": [f"img{i}" for i in range(30) for _ in (0, 2)], "text": texts})
    pairs = ImageTextPairs(captions, load_region_store(str(root / "regions"))[0])
    processor = CMALProcessor(CMALImageProcessor(concept_names=NAMES, max_regions=8), build_word_tokenizer(texts),
                              AnchorLexicon(NAMES).to_dict())  # fmt: skip
    return pairs, processor


def batches(pairs, processor, features_in_main: bool, workers: int, streamed: bool, epoch: int) -> list[dict]:
    collator = PretrainingCollator(processor, pairs, mrm_probability=0.3, seed=5, features_in_main=features_in_main)
    data = StreamingPairs(pairs, 8, num_shards=4, num_workers=workers, seed=5) if streamed else pairs
    data.set_epoch(epoch)
    loader = DataLoader(data, batch_size=None if streamed else 8, collate_fn=collator, num_workers=workers)
    return [data.finish_batch(batch) for batch in loader]


def assert_same_batches(made: list[dict], other: list[dict]) -> None:
    """As many batches, each with the same keys, dtypes and values."""
    assert len(made) == len(other) > 1
    for one, another in zip(made, other):
        assert one.keys() == another.keys()
        for key in one:
            assert one[key].dtype == another[key].dtype and torch.equal(one[key], another[key]), key


@pytest.mark.parametrize("streamed", [False, True], ids=["map-style", "streamed"])
@pytest.mark.parametrize("workers", [0, 2])
def test_gathered_batches_equal_the_collators(pairs_and_processor, workers, streamed):
    pairs, processor = pairs_and_processor
    for epoch in (0, 1):  # a stream's shards depend on its readers: both paths read with the same workers
        made = batches(pairs, processor, False, workers if streamed else 0, streamed, epoch)
        gathered = batches(pairs, processor, True, workers, streamed, epoch)
        assert_same_batches(made, gathered)
    assert made[0]["visual_feats"].dtype == torch.float16
    assert max(batch["visual_feats"].shape[1] for batch in made) == 8 < pairs.num_regions().max()  # cut to 8 by score


@pytest.mark.parametrize("streamed", [False, True], ids=["map-style", "streamed"])
@pytest.mark.parametrize("workers", [0, 2])
def test_captions_encoded_once_give_the_batches_of_captions_tokenized_per_batch(pairs_and_processor, workers, streamed):
    """`encode_captions` + `ImageTextPairs(..., tokens)`: items carry their encoded caption, the collator only pads it;
    every batch (text side, masks drawn on it, ITM pairs, features) is the one tokenizing per batch makes."""
    pairs, processor = pairs_and_processor
    tokens = encode_captions(pairs.texts, processor, max_length=40)
    assert len(tokens) == len(pairs) and tokens.features["input_ids"].feature.dtype == "int32"
    encoded = ImageTextPairs(pairs.texts, pairs.regions, tokens)
    for epoch in (0, 1):
        made = batches(pairs, processor, True, workers, streamed, epoch)
        padded = batches(encoded, processor, True, workers, streamed, epoch)
        assert_same_batches(made, padded)
    assert (made[0]["labels"] != -100).any() and (made[0]["token_concept_ids"] >= 0).any()  # masks and anchors drawn


def test_tokens_of_other_captions_are_refused(pairs_and_processor):
    pairs, processor = pairs_and_processor
    tokens = encode_captions(pairs.texts.select(range(10)), processor, max_length=40)
    with pytest.raises(ValueError, match=rf"`tokens` has 10 rows for {len(pairs)} texts: encode these texts"):
        ImageTextPairs(pairs.texts, pairs.regions, tokens)


def test_captions_encoded_longer_than_the_collator_reads_are_refused(pairs_and_processor):
    pairs, processor = pairs_and_processor
    encoded = ImageTextPairs(pairs.texts, pairs.regions, encode_captions(pairs.texts, processor, max_length=40))
    collator = PretrainingCollator(processor, encoded, max_length=5, features_in_main=True)
    with pytest.raises(ValueError, match=r"captions encoded with more than the collator's max_length \(\d+ > 5 tokens\)"):
        collator(encoded.__getitems__(range(8)))


def test_workers_never_carry_features_or_tensors(pairs_and_processor):
    pairs, processor = pairs_and_processor
    collator = PretrainingCollator(processor, pairs, seed=5, features_in_main=True)
    batch = collator([pairs[i] for i in range(8)])
    assert "visual_feats" not in batch and all(isinstance(value, np.ndarray) for value in batch.values())  # no tensor
    assert ((batch["region_index"] >= 0) == batch["visual_attention_mask"].astype(bool)).all()


def test_a_store_holding_nan_features_is_refused_at_the_gather(pairs_and_processor, monkeypatch):
    pairs, processor = pairs_and_processor
    batch = PretrainingCollator(processor, pairs, seed=5, features_in_main=True)([pairs[i] for i in range(8)])
    read = pairs.read_regions

    def poisoned(rows, columns=None):
        regions = read(rows, columns)
        regions[2]["features"] = np.full_like(regions[2]["features"], np.nan)
        return regions

    monkeypatch.setattr(pairs, "read_regions", poisoned)
    with pytest.raises(ValueError, match=rf"features of image row {int(batch['image_rows'][2])} hold NaN or infinite values"):
        pairs.finish_batch(batch)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_agrees_with_numpy_on_every_float16_value(dtype):
    """Every float16 bit pattern (both zeros, subnormals, the largest finite values, both infinities, every NaN),
    alone and inside a block of finite features: the float16 bit test answers as `np.isfinite(...).all()`."""
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(dtype)
    block = np.ones((4, 8), dtype)
    assert all_finite(block) and all_finite(block[:0])
    for value in values[:: 1 if dtype == np.float16 else 257]:
        block[2, 5] = value
        assert all_finite(block) == bool(np.isfinite(value)), value
        assert all_finite(block[2:3, 5:6]) == bool(np.isfinite(value)), value
