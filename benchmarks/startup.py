"""Start-up of pre-training at corpus scale: joining N captions to their images and sizing them for the sampler.

    python benchmarks/startup.py --captions 2000000      # builds the corpus once under --folder, then times
    python benchmarks/startup.py --captions 1000000 --pretokenize   # also `pretrain.py --pretokenize`'s encoding

Every rank does this before its first step, so it must not grow with Python loops over the captions. The
corpus: N captions of 5-15 words, five per image, over a region store of N/5 images (2 tiny regions each:
the region features do not matter here). Prints one JSON line: seconds to build `ImageTextPairs` (the
join), to compute `lengths()` and `easy_pairs()`, their sum, and the length-grouped sampler's order of one
epoch (computed again at every epoch). `--pretokenize` adds the captions' encoding (`encode_captions`): its
first run (the cache removed first), a later run's load of the cached table, and the join with the tokens.
"""

import argparse
import json
import os
import time

import datasets
import numpy as np

from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor
from cmal.training.data.pretraining import ImageTextPairs, LengthGroupedSampler, encode_captions
from cmal.training.data.region_store import RegionStoreWriter, load_region_store
from cmal.training.data.tokenizer import build_word_tokenizer


WORDS = np.array("a man riding a red bike down the street next to his dog on a sunny day".split())


def build_corpus(folder: str, captions: int) -> None:
    """`folder/regions` and `folder/captions` (a `pretrain.py --dataset` folder), unless already there."""
    if os.path.isdir(os.path.join(folder, "captions")):
        return
    images = max(1, captions // 5)
    with RegionStoreWriter(os.path.join(folder, "regions"), 4, ["a", "b"], source="benchmark", shard_size=100_000) as writer:
        for i in range(images):
            writer.add(dict(image_id=f"img{i}", image_width=10, image_height=10, features=np.zeros((2, 4), np.float32),
                            boxes=[[0, 0, 1, 1]] * 2))  # fmt: skip
    rng = np.random.default_rng(0)
    texts = [" ".join(WORDS[rng.integers(0, len(WORDS), rng.integers(5, 16))]) for _ in range(captions)]
    table = datasets.Dataset.from_dict({"image_id": [f"img{i % images}" for i in range(captions)], "text": texts})
    table.save_to_disk(os.path.join(folder, "captions"))


def measure(folder: str) -> dict:
    regions, _ = load_region_store(os.path.join(folder, "regions"))
    captions = datasets.load_from_disk(os.path.join(folder, "captions"))
    start = time.perf_counter()
    pairs = ImageTextPairs(captions, regions)
    joined = time.perf_counter()
    lengths, _ = pairs.lengths(), pairs.easy_pairs()
    sized = time.perf_counter()
    order = list(LengthGroupedSampler(lengths, batch_size=32))
    ordered = time.perf_counter()
    assert len(order) == len(captions)
    return {"captions": len(captions), "images": len(regions), "join_seconds": joined - start,
            "lengths_seconds": sized - joined, "startup_seconds": sized - start,
            "epoch_order_seconds": ordered - sized}  # fmt: skip


def measure_encoding(folder: str) -> dict:
    """Seconds of `encode_captions` on a first run and on a later one (the cached table loaded), and of the join
    with the tokens: what `pretrain.py --pretokenize` adds to a start-up."""
    regions, _ = load_region_store(os.path.join(folder, "regions"))
    captions = datasets.load_from_disk(os.path.join(folder, "captions"))
    names = ["man", "bike", "dog"]
    processor = CMALProcessor(CMALImageProcessor(concept_names=names), build_word_tokenizer(WORDS.tolist()), AnchorLexicon(names).to_dict())
    captions.cleanup_cache_files()  # a first run
    start = time.perf_counter()
    encode_captions(captions, processor, 40)
    encoded = time.perf_counter()
    tokens = encode_captions(captions, processor, 40)
    loaded = time.perf_counter()
    ImageTextPairs(captions, regions, tokens)
    return {"encode_seconds": encoded - start, "encode_microseconds_per_caption": (encoded - start) / len(captions) * 1e6,
            "encoded_load_seconds": loaded - encoded, "join_with_tokens_seconds": time.perf_counter() - loaded}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=1_000_000)
    p.add_argument("--folder", default=None, help="Where the corpus is built (default: outputs/startup-N).")
    p.add_argument("--pretokenize", action="store_true", help="Also time the captions' encoding (first and cached).")
    args = p.parse_args(argv)
    folder = args.folder or f"outputs/startup-{args.captions}"
    build_corpus(folder, args.captions)
    report = measure(folder) | (measure_encoding(folder) if args.pretokenize else {})
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
