"""How fast pre-training's data pipeline feeds a model: samples per second and per CPU-second, warm and cold, for the
path training takes (`gather`: DataLoader workers make the text side, masks and region slots, the main process
gathers the features from its own memory map, `ImageTextPairs.finish_batch`) next to the path before it (`collate`:
the collator copies the features into the batch, which workers then send through shared memory) and the gather
path with its captions encoded once (`pretokenized`, `pretrain.py --pretokenize`: the batches only pad them).

    python benchmarks/data_pipeline.py                                  # 20,000 images of 36 x 2048-d fp16 (~3 GB)
    python benchmarks/data_pipeline.py --regions 10-100 --workers 0 2   # adaptive region counts

Builds (once, under --folder) a `pretrain.py --dataset` folder of random bottom-up-attention-sized regions
and five captions per image, then times `pretrain_run.build_data`'s DataLoader as training uses it (same
sampler, collator, masking and ITM negatives, each batch finished as the loop finishes it) for each `--workers`,
warm (the store in the page cache), cold (evicted with `posix_fadvise(DONTNEED)` first) and, in-process, mapped
(every page of the store touched once first, as in a later epoch). Workers' CPU is read from /proc while they run, from their first batches on,
so their start-up is left out, as an epoch of thousands of batches leaves it out. The paths alternate in
`--rounds` rounds,
each reading other images (its own seed), so a drift of the shared machine lands on all; each row gives the
median and the range over the rounds. CPU time counts the main process and its DataLoader workers.
`loader_cores_per_gpu` is `--gpu_samples_per_second` (10,000: CMAL-base at 40% MFU on an H100) divided by the
samples per CPU-second. Prints one JSON line per (workers, cache, path) and returns them.
"""

import argparse
import glob
import json
import os
import time

import datasets
import numpy as np
import torch

from cmal.training import pretrain, pretrain_run
from cmal.training.data.region_store import RegionStoreWriter


def build_corpus(folder: str, images: int, feature_dim: int, regions: tuple[int, int], seed: int = 0) -> None:
    """`folder/regions` (fp16 features) and `folder/captions`, unless already there."""
    if os.path.isdir(os.path.join(folder, "captions")):
        return
    rng = np.random.default_rng(seed)
    names = ["dog", "cat", "ball", "car", "tree"]
    with RegionStoreWriter(os.path.join(folder, "regions"), feature_dim, names, source="benchmark", shard_size=1000) as writer:
        for i in range(images):
            n = int(rng.integers(regions[0], regions[1] + 1))
            corner = rng.uniform(0, 0.5, (n, 2))
            writer.add(dict(image_id=f"img{i}", image_width=640, image_height=480,
                            features=rng.standard_normal((n, feature_dim), dtype=np.float32).astype(np.float16),
                            boxes=np.concatenate([corner, corner + rng.uniform(0.05, 0.5, (n, 2))], 1),
                            concept_ids=rng.integers(0, len(names), n), scores=rng.uniform(0.2, 1, n)))  # fmt: skip
    texts = [f"a {names[i % 5]} next to a {names[(i // 5) % 5]} in a picture with {k + 1} things" for i in range(images) for k in range(5)]
    captions = datasets.Dataset.from_dict({"image_id": [f"img{i}" for i in range(images) for _ in range(5)], "text": texts})
    datasets.DatasetDict(train=captions).save_to_disk(os.path.join(folder, "captions"))


def evict(folder: str) -> None:
    """Drop the store's files from the page cache, so the next read comes from disk."""
    for path in glob.glob(os.path.join(folder, "**", "*.arrow"), recursive=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def map_store(pairs) -> None:
    """Touch every feature once, so this process has the store's pages mapped (a later epoch of a store that
    fits in memory, read in-process): what is left is the pipeline's compute, not first-touch page faults."""
    for start in range(0, pairs.num_images, 256):
        for region in pairs.read_regions(range(start, min(start + 256, pairs.num_images))):
            region["features"].view(np.uint8).max(initial=0)


def measure(args, corpus, workers: int, cache: str, path: str, seed: int) -> dict:
    """Samples, seconds and CPU-seconds (this process and its workers) over `--batches` batches after one warm-up.
    Each measurement gets its own `seed`, so its batches hold other images than the ones before it read."""
    run = pretrain.parse_args(["--dataset", args.folder, "--report_to", "none", "--num_workers", str(workers),
                               "--per_device_train_batch_size", str(args.batch_size), "--curriculum_epochs", "0",
                               "--seed", str(seed), *(["--pretokenize"] if path == "pretokenized" else [])])  # fmt: skip
    *_, pairs, collator, loader = pretrain_run.build_data(run, corpus)  # captions encoded once, then cached: not timed
    collator.features_in_main = path != "collate"  # before the workers fork: they copy the collator
    if cache == "cold":
        evict(args.folder)
    elif cache == "mapped":
        map_store(pairs)
    batches = iter(loader)
    for _ in range(1 + 2 * workers):  # workers started, their first batches out
        pairs.finish_batch(next(batches))
    workers_cpu = worker_seconds(batches)
    cpu, wall, samples, regions = time.process_time(), time.perf_counter(), 0, 0
    for _ in range(args.batches):
        batch = pairs.finish_batch(next(batches))  # as the training loop does
        samples += len(batch["input_ids"])
        regions += int(batch["visual_attention_mask"].sum())
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu + worker_seconds(batches) - workers_cpu
    return {"samples_per_second": samples / wall, "samples_per_cpu_second": samples / cpu,
            "feature_mb_per_second": regions * args.feature_dim * 2 / wall / 2**20}  # fmt: skip


def worker_seconds(batches) -> float:
    """CPU seconds the DataLoader's worker processes have used so far (Linux's /proc): read while they run, so
    their start-up (fork, first batches) stays out of a steady state's figure. 0 in-process."""
    ticks = 0
    for worker in getattr(batches, "_workers", []):
        with open(f"/proc/{worker.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def summary(args, workers: int, cache: str, path: str, rounds: list[dict]) -> dict:
    """Median and range over the rounds of each figure."""
    report = {"workers": workers, "cache": cache, "path": path, "rounds": len(rounds)}
    for key in rounds[0]:
        values = sorted(r[key] for r in rounds)
        report[key] = float(np.median(values))
        report[f"{key}_range"] = [values[0], values[-1]]
    report["loader_cores_per_gpu"] = args.gpu_samples_per_second / report["samples_per_cpu_second"]
    return report


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--feature_dim", type=int, default=2048)
    p.add_argument("--regions", default="36", help="Regions per image: N, or MIN-MAX for adaptive counts.")
    p.add_argument("--folder", default=None, help="Where the corpus is built (default: outputs/pipeline-...).")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--caches", nargs="+", choices=["warm", "cold", "mapped"], default=["warm", "cold", "mapped"],
                   help="mapped (0 workers only: forked workers fault the pages in again): the store touched first.")
    p.add_argument("--gpu_samples_per_second", type=float, default=10_000.0)
    p.add_argument("--rounds", type=int, default=3, help="Rounds of the paths, alternating.")
    p.add_argument("--paths", nargs="+", choices=["gather", "collate", "pretokenized"], default=["gather", "collate", "pretokenized"],
                   help="pretokenized: the gather path with `--pretokenize` (the captions encoded once, padded per batch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers always take 1): "
                   "the pipeline's own ops are small, and idle OpenMP threads spinning between them count as CPU time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    low, _, high = args.regions.partition("-")
    regions = (int(low), int(high or low))
    args.folder = args.folder or f"outputs/pipeline-{args.images}x{args.regions}x{args.feature_dim}"
    build_corpus(args.folder, args.images, args.feature_dim, regions)
    corpus = pretrain_run.load_corpus(pretrain.parse_args(["--dataset", args.folder, "--report_to", "none"]))
    reports, seed = [], 0
    for workers in args.workers:
        for cache in args.caches:
            if cache == "mapped" and workers:
                continue
            rounds = {path: [] for path in args.paths}
            for _ in range(args.rounds):
                for path in args.paths:
                    rounds[path].append(measure(args, corpus, workers, cache, path, seed))
                    seed += 1
            for path in args.paths:
                reports.append(summary(args, workers, cache, path, rounds[path]))
                print(json.dumps(reports[-1]))
    return reports


if __name__ == "__main__":
    main()
