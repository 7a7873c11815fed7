"""Start-up of pre-training at corpus scale: joining N captions to their images and sizing them for the sampler.

    python benchmarks/startup.py --captions 2000000      # builds the corpus once under --folder, then times

Every rank does this before its first step, so it must not grow with Python loops over the captions. The
corpus: N captions of 5-15 words, five per image, over a region store of N/5 images (2 tiny regions each:
the region features do not matter here). Prints one JSON line: seconds to build `ImageTextPairs` (the
join), to compute `lengths()` and `easy_pairs()`, their sum, and the length-grouped sampler's order of one
epoch (computed again at every epoch).
"""

import argparse
import json
import os
import time

import datasets
import numpy as np

from cmal.training.data.pretraining import ImageTextPairs, LengthGroupedSampler
from cmal.training.data.region_store import RegionStoreWriter, load_region_store


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=1_000_000)
    p.add_argument("--folder", default=None, help="Where the corpus is built (default: outputs/startup-N).")
    args = p.parse_args(argv)
    folder = args.folder or f"outputs/startup-{args.captions}"
    build_corpus(folder, args.captions)
    report = measure(folder)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
