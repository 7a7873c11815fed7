"""Speed, memory and FLOPs of CMAL against VisualBERT and LXMERT (transformers) on the same inputs.

    python benchmarks/speed.py                                    # CPU, base size, batch 8, fp32, ~6 min on 2 cores
    python benchmarks/speed.py --output_json outputs/speed.json   # also write the results as JSON
    python benchmarks/speed.py --device cuda --batch_size 64 --steps 20 --warmup 5   # GPU, bf16
    python benchmarks/speed.py --size tiny --batch_size 2 --steps 1 --warmup 0 --no_data   # smoke test

Every model gets the same batch (batch_size x num_regions regions x text_len tokens) and the same
training loss: a linear head on the pooled output, cross-entropy, AdamW. Peers, at CMAL's hidden size:
VisualBERT with as many layers as CMAL's text path (text + unified layers: 12 at base) and LXMERT with
l/x/r layers 9/5/5 at base (scaled down for the smaller presets). Rows: inference (no_grad, eval) and
training step (forward + backward + AdamW) for eager and sdpa attention, training with and without
gradient checkpointing; an option a model does not support in transformers is printed as n/a.

Timing interleaves the models (one step of each configuration per round, `--steps` rounds after
`--warmup` rounds) and reports the median, so machine noise hits every model alike. Memory is the
peak of `torch.cuda.max_memory_allocated` on cuda, and on CPU of `MemTracker` (total and activations).
FLOPs come from `FlopCounterMode`; MFU is achieved FLOP/s over a timed large square matmul at the same
dtype. Adaptive regions (`--adaptive_examples`, `--adaptive_batches`): one corpus of examples (10-100 regions,
COCO-like captions, half of them ITM negatives) batched at random, by pre-training's length-grouped sampler,
and with its negative window; batches spread over each epoch are trained, giving samples/s, the FLOP share
spent on padding, and CMAL/VisualBERT speed at equal FLOPs per real token. The data pipeline of `training/pretrain.py` (wired as in its `main()`) is timed against the
training step of the `small` CMALForPreTraining at the pre-training batch size (32).
"""

import argparse
import datetime
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode
from transformers import LxmertConfig, LxmertModel, VisualBertConfig, VisualBertModel

from cmal.modeling_cmal import CMALConfig, CMALModel
from cmal.training.model_setup import enable_activation_checkpointing


LXMERT_LAYERS = {"tiny": (1, 1, 1), "small": (3, 2, 2), "base": (9, 5, 5)}  # (l, x, r); base is LXMERT's own
ATTENTIONS = ("eager", "sdpa")
NUM_CLASSES = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "small", "base"], default="base", help="CMAL preset; peers match it.")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_regions", type=int, default=36)
    p.add_argument("--text_len", type=int, default=40)
    p.add_argument("--steps", type=int, default=5, help="Timed rounds (median reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="Default: bf16 on cuda, fp32 on cpu.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    p.add_argument("--data_steps", type=int, default=10, help="Batches of the data pipeline to time.")
    p.add_argument("--no_data", action="store_true", help="Skip the data-pipeline measurement.")
    p.add_argument("--adaptive_examples", type=int, default=4000,
                   help="Examples the adaptive-region measurement batches (10-100 regions per image; 0 skips it).")
    p.add_argument("--adaptive_batches", type=int, default=12, help="Of their batches, how many are measured.")
    p.add_argument("--output_json", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def environment(args) -> dict:
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device": args.device, "device_name": device, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


class Classifier(nn.Module):
    """A backbone, its pooled output, a linear head: the same training loss for every model."""

    def __init__(self, backbone: nn.Module, pooled_key: str, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.pooled_key = pooled_key
        self.head = nn.Linear(hidden_size, NUM_CLASSES)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head(self.backbone(**inputs)[self.pooled_key])


def build_models(size: str, visual_feat_dim: int) -> dict:
    """name -> dict(model, inputs adapter, depth in words, supported options)."""
    c = CMALConfig.from_preset(size, visual_feat_dim=visual_feat_dim)
    shared = dict(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                  intermediate_size=c.intermediate_size, vocab_size=c.vocab_size)  # fmt: skip
    visual_bert = VisualBertConfig(**shared, num_hidden_layers=c.num_text_layers + c.num_hidden_layers,
                                   visual_embedding_dim=visual_feat_dim)  # fmt: skip
    l_layers, x_layers, r_layers = LXMERT_LAYERS[size]
    lxmert = LxmertConfig(**shared, l_layers=l_layers, x_layers=x_layers, r_layers=r_layers,
                          visual_feat_dim=visual_feat_dim, visual_pos_dim=4)  # fmt: skip
    backbones = {
        "CMAL": (CMALModel(c), "pooler_output", cmal_inputs,
                 f"{c.num_text_layers} text + {c.num_visual_layers} visual + {c.num_hidden_layers} unified layers"),
        "VisualBERT": (VisualBertModel(visual_bert), "pooler_output", visual_bert_inputs,
                       f"{visual_bert.num_hidden_layers} layers"),
        "LXMERT": (LxmertModel(lxmert), "pooled_output", lxmert_inputs,
                   f"l/x/r = {l_layers}/{x_layers}/{r_layers} layers"),
    }  # fmt: skip
    models = {}
    for name, (backbone, pooled_key, adapter, depth) in backbones.items():
        model = Classifier(backbone, pooled_key, c.hidden_size)
        models[name] = {
            "model": model, "adapter": adapter, "depth": depth,
            "params": sum(p.numel() for p in backbone.parameters()),
            "attentions": [a for a in ATTENTIONS if a == "eager" or backbone._supports_sdpa],
            "checkpointing": backbone.supports_gradient_checkpointing,
        }  # fmt: skip
    return models


def make_batch(args, vocab_size: int, visual_feat_dim: int, num_concepts: int, device, dtype) -> dict:
    """Random inputs; CMAL also gets concept ids (a fifth of the tokens, every region) so its anchor swap runs."""
    g = torch.Generator().manual_seed(args.seed)
    b, n, t = args.batch_size, args.num_regions, args.text_len
    corners = torch.rand(b, n, 2, 2, generator=g).sort(dim=-1).values  # (x|y, low|high): x1 <= x2, y1 <= y2
    boxes = torch.stack([corners[..., 0, 0], corners[..., 1, 0], corners[..., 0, 1], corners[..., 1, 1]], dim=-1)
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    batch = {
        "input_ids": torch.randint(1, vocab_size, (b, t), generator=g),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "visual_feats": torch.randn(b, n, visual_feat_dim, generator=g).relu().to(dtype),
        "visual_pos": torch.cat([boxes, width[..., None], height[..., None], (width * height)[..., None]], -1).to(dtype),
        "visual_attention_mask": torch.ones(b, n, dtype=torch.long),
        "token_concept_ids": torch.randint(0, num_concepts, (b, t), generator=g).where(torch.rand(b, t, generator=g) < 0.2, -1),
        "region_concept_ids": torch.randint(0, num_concepts, (b, n), generator=g),
        "region_scores": torch.rand(b, n, generator=g).to(dtype),
        "labels": torch.randint(0, NUM_CLASSES, (b,), generator=g),
    }
    return {key: value.to(device) for key, value in batch.items()}


def cmal_inputs(batch):
    names = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask",
             "token_concept_ids", "region_concept_ids", "region_scores")  # fmt: skip
    return {name: batch[name] for name in names}


def visual_bert_inputs(batch):
    return {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"], "visual_embeds": batch["visual_feats"],
        "visual_attention_mask": batch["visual_attention_mask"],
        "visual_token_type_ids": torch.ones_like(batch["visual_attention_mask"]),
    }  # fmt: skip


def lxmert_inputs(batch):
    return {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"], "visual_feats": batch["visual_feats"],
        "visual_pos": batch["visual_pos"][..., :4], "visual_attention_mask": batch["visual_attention_mask"],
    }  # fmt: skip


def configure(entry, attention: str, checkpointing: bool, training: bool):
    model = entry["model"]
    model.backbone.set_attn_implementation(attention)
    if checkpointing:
        enable_activation_checkpointing(model.backbone)
    elif entry["checkpointing"]:
        # the new name where transformers has it (the old one warns), the old one on 5.0
        getattr(model.backbone, "activation_checkpointing_disable", model.backbone.gradient_checkpointing_disable)()
    model.train(training)


def make_step(entry, batch, optimizer, training: bool):
    """One inference forward or one training step of a configured model, as a closure."""
    model, inputs = entry["model"], entry["adapter"](batch)

    def infer():
        with torch.no_grad():
            model(inputs)

    def train():
        loss = F.cross_entropy(model(inputs).float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train if training else infer


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters; CPU and CUDA): the same for every model."""
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class ActivationPeakTracker(MemTracker):
    """MemTracker that also keeps the peak of the activation category on its own (its "peak" snapshot is
    taken at the peak total, which for a training step is the optimizer step, after activations are freed)."""

    def __init__(self):
        super().__init__()
        self.peak_activations = 0

    def _update_peak_stats(self, peak_state):
        super()._update_peak_stats(peak_state)
        for snapshot in self._curr_mem_snap.values():
            self.peak_activations = max(self.peak_activations, snapshot["Activation"])


def time_step(step, device) -> float:
    """Wall time of one step, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_memory(step, entry, optimizer, device) -> dict:
    """Peak bytes of one step: total and activations. Run it after a first step (the FLOP count's), so that
    the optimizer state exists."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize(device)
        return {"peak_total": torch.cuda.max_memory_allocated(), "peak_activations": None}
    tracker = ActivationPeakTracker()
    tracker.track_external(entry["model"], optimizer)
    with tracker:
        step()
    return {"peak_total": tracker.get_tracker_snapshot("peak")[device]["Total"],
            "peak_activations": tracker.peak_activations}  # fmt: skip


def matmul_peak(device, dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n^3 matmul, the best of `repeats`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def plan(models: dict) -> list[dict]:
    """Every (model, mode, attention, checkpointing) row; unsupported options are rows marked n/a."""
    rows = []
    for name, entry in models.items():
        for mode, checkpointing_options in (("inference", (False,)), ("training", (False, True))):
            for attention in ATTENTIONS:
                for checkpointing in checkpointing_options:
                    supported = attention in entry["attentions"] and (not checkpointing or entry["checkpointing"])
                    rows.append({"model": name, "mode": mode, "attention": attention,
                                 "checkpointing": checkpointing, "supported": supported})  # fmt: skip
    return rows


def measure(args, models: dict, batch: dict, device) -> list[dict]:
    rows = plan(models)
    optimizers = {name: make_optimizer(entry["model"], 1e-5) for name, entry in models.items()}

    def run(row, what):
        entry = models[row["model"]]
        training = row["mode"] == "training"
        configure(entry, row["attention"], row["checkpointing"], training)
        step = make_step(entry, batch, optimizers[row["model"]], training)
        if what == "time":
            return time_step(step, device)
        if what == "flops":
            return count_flops(step)
        return peak_memory(step, entry, optimizers[row["model"]], device)

    active = [row for row in rows if row["supported"]]
    for row in active:
        row["flops_per_sample"] = run(row, "flops") / args.batch_size  # also makes the optimizer state
        row.update(run(row, "memory"))
        row["times"] = []
    for round_index in range(args.warmup + args.steps):  # interleaved: one step of each row per round
        for row in active:
            seconds = run(row, "time")
            print(f"round {round_index}: {row['model']} {row['mode']} {row['attention']} {seconds:.2f} s", file=sys.stderr)
            if round_index >= args.warmup:
                row["times"].append(seconds)
    for row in active:
        row["seconds_per_step"] = statistics.median(row.pop("times"))
        row["samples_per_s"] = args.batch_size / row["seconds_per_step"]
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]):
    """CMAL / peer speed and memory, row by row (same mode, attention, checkpointing)."""
    key = lambda row: (row["mode"], row["attention"], row["checkpointing"])  # noqa: E731
    cmal = {key(row): row for row in rows if row["model"] == "CMAL" and row["supported"]}
    for row in rows:
        mine = cmal.get(key(row))
        if row["model"] == "CMAL" or not row["supported"] or mine is None:
            continue
        row["cmal_speed_ratio"] = mine["samples_per_s"] / row["samples_per_s"]
        row["cmal_memory_ratio"] = mine["peak_total"] / row["peak_total"]
        if row.get("peak_activations"):
            row["cmal_activation_ratio"] = mine["peak_activations"] / row["peak_activations"]


def checkpointing_saving(rows: list[dict], model: str = "CMAL", attention: str = "eager") -> float:
    """Share of training activation memory that gradient checkpointing saves (CPU: MemTracker's activations)."""
    field = "peak_activations" if rows[0].get("peak_activations") is not None else "peak_total"
    pick = {row["checkpointing"]: row[field] for row in rows
            if row["model"] == model and row["mode"] == "training" and row["attention"] == attention}  # fmt: skip
    return 1 - pick[True] / pick[False]


def time_data_pipeline(args, device) -> dict:
    """Pre-training batches/s of `training/pretrain.py`'s data pipeline vs the `small` model's training step."""
    from cmal.modeling_cmal import CMALForPreTraining
    from cmal.training import pretrain, pretrain_run

    p = pretrain.parse_args([])
    config, _, _, _, loader = pretrain_run.build_data(p, pretrain_run.load_corpus(p))

    batches, iterator = [], iter(loader)
    batches.append(loader.dataset.finish_batch(next(iterator)))  # first batch: iterator start-up, not counted
    start = time.perf_counter()
    for _ in range(args.data_steps):
        batches.append(loader.dataset.finish_batch(next(iterator)))  # as the training loop does
    data_seconds = (time.perf_counter() - start) / args.data_steps

    model = CMALForPreTraining(config).to(device).train()
    optimizer = make_optimizer(model, p.learning_rate)
    times = []
    for i in range(args.warmup + args.steps):
        batch = {key: value.to(device) for key, value in batches[i % len(batches)].items()}
        synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    batch_size = p.per_device_train_batch_size
    data_rate, train_rate = batch_size / data_seconds, batch_size / statistics.median(times)
    return {"batch_size": batch_size, "num_workers": p.num_workers, "model": "CMALForPreTraining (small, fp32)",
            "data_samples_per_s": data_rate, "train_samples_per_s": train_rate, "ratio": data_rate / train_rate}  # fmt: skip


ADAPTIVE_SCHEMES = {  # name -> (length-grouped batches, ITM negative window)
    "random batches": (False, 0),  # a plain shuffling DataLoader, negatives from any image
    "length-grouped": (True, 0),  # CMAL's sampler, negatives from any image (its default)
    "length-grouped + negative window": (True, 1000),  # `--itm_negative_window 1000`
}
ADAPTIVE_ROWS = (  # (model, batching, padding-free: CMALConfig.padding_free)
    [("CMAL", scheme, False) for scheme in ADAPTIVE_SCHEMES]
    + [("CMAL", scheme, True) for scheme in ("random batches", "length-grouped")]
    + [("VisualBERT", "random batches", False), ("VisualBERT", "length-grouped + negative window", False)]
)


def adaptive_batches(args, scheme: str) -> list[list[tuple[int, int]]]:
    """(tokens, regions) of each example of each batch: COCO-like captions (13 word pieces on average with
    [CLS]/[SEP]) over images of 10-100 regions drawn from a 100k-image corpus; half the examples are ITM
    negatives whose image is another one, drawn as `scheme` says (pre-training's sampler and negatives)."""
    from cmal.training.data.pretraining import LengthGroupedSampler, NegativeImages

    grouped, window = ADAPTIVE_SCHEMES[scheme]
    rng = np.random.default_rng(args.seed)
    most = min(100, CMALConfig.from_preset(args.size).max_regions)  # the tiny preset takes 50
    corpus_regions = rng.integers(10, most + 1, 100_000)
    n = args.adaptive_examples
    tokens = np.clip(rng.normal(13.0, 3.0, n).round(), 7, 40).astype(int)
    draw, negatives = np.random.default_rng(args.seed + 1), NegativeImages(corpus_regions, window)
    images = [negatives(i, draw) if draw.random() < 0.5 else i for i in range(n)]
    lengths = (tokens + corpus_regions[:n]).tolist()  # what the sampler sees: the caption and its own image
    order = list(LengthGroupedSampler(lengths, args.batch_size, seed=args.seed)) if grouped else rng.permutation(n).tolist()
    examples = [(int(tokens[i]), int(corpus_regions[images[i]])) for i in order]
    return [examples[k : k + args.batch_size] for k in range(0, n, args.batch_size)]


def padded_batch(examples, args, device, dtype, seed: int) -> dict:
    """`make_batch` at the batch's longest text and largest region count, the rest masked as padding."""
    defaults = CMALConfig()
    text_len, num_regions = max(t for t, _ in examples), max(r for _, r in examples)
    shape = argparse.Namespace(batch_size=len(examples), num_regions=num_regions, text_len=text_len, seed=seed)
    batch = make_batch(shape, defaults.vocab_size, defaults.visual_feat_dim, defaults.num_concepts, device, dtype)
    for b, (t, r) in enumerate(examples):
        batch["attention_mask"][b, t:] = 0
        batch["visual_attention_mask"][b, r:] = 0
    return batch


def configure_adaptive(entry, padding_free: bool, training: bool):
    configure(entry, "eager", False, training)
    config = entry["model"].backbone.config
    if hasattr(config, "padding_free"):  # CMAL's option; the peers have none
        config.padding_free = padding_free


def measure_adaptive(args, models: dict, device, dtype) -> dict:
    """Per scheme, `--adaptive_batches` batches spread over the epoch of `--adaptive_examples` examples (so the
    sampler groups as it would in a corpus: mega-batches of 50 batches): training samples/s (eager attention
    for both models, interleaved batch by batch), the FLOP share spent on padding (forward FLOPs of each padded
    batch vs of each of its examples alone), and CMAL/VisualBERT speed at equal FLOPs per real token (samples/s
    weighted by each model's forward FLOPs per real example). CMAL runs padded and padding-free."""
    picked = {}
    for scheme in ADAPTIVE_SCHEMES:
        every = adaptive_batches(args, scheme)
        stride = max(len(every) // args.adaptive_batches, 1)
        picked[scheme] = every[::stride][: args.adaptive_batches]
    batches = {scheme: [padded_batch(b, args, device, dtype, args.seed + k) for k, b in enumerate(chosen)]
               for scheme, chosen in picked.items()}  # fmt: skip
    optimizers = {name: make_optimizer(models[name]["model"], 1e-5) for name, _, _ in ADAPTIVE_ROWS}

    @functools.cache
    def alone(name, example) -> int:
        """Forward FLOPs of one (tokens, regions) example in a batch of its own."""
        configure_adaptive(models[name], False, training=False)
        return count_flops(make_step(models[name], padded_batch([example], args, device, dtype, 0), None, False))

    rows = []
    for name, scheme, padding_free in ADAPTIVE_ROWS:
        real = sum(alone(name, example) for batch in picked[scheme] for example in batch)
        configure_adaptive(models[name], padding_free, training=False)
        padded = sum(count_flops(make_step(models[name], batch, None, False)) for batch in batches[scheme])
        samples = sum(len(batch) for batch in picked[scheme])
        rows.append({"model": name, "scheme": scheme, "padding_free": padding_free, "padded_flop_share": 1 - real / padded,
                     "real_flops_per_sample": real / samples, "samples": samples, "seconds": 0.0})  # fmt: skip
    for row in rows:  # warm-up: one step each
        configure_adaptive(models[row["model"]], row["padding_free"], training=True)
        make_step(models[row["model"]], batches["random batches"][0], optimizers[row["model"]], True)()
    for k in range(args.adaptive_batches):
        for row in rows:
            if k >= len(batches[row["scheme"]]):
                continue
            configure_adaptive(models[row["model"]], row["padding_free"], training=True)
            step = make_step(models[row["model"]], batches[row["scheme"]][k], optimizers[row["model"]], True)
            row["seconds"] += time_step(step, device)
    configure_adaptive(models["CMAL"], False, training=False)  # the other sections measure the padded model
    for row in rows:
        row["samples_per_s"] = row["samples"] / row.pop("seconds")
    peer = next(row for row in rows if (row["model"], row["scheme"]) == ("VisualBERT", "random batches"))
    for row in rows:
        row["speed_at_equal_flops_vs_visualbert"] = (row["samples_per_s"] * row["real_flops_per_sample"]) / (
            peer["samples_per_s"] * peer["real_flops_per_sample"])
    return {"examples": args.adaptive_examples, "batches": args.adaptive_batches, "batch_size": args.batch_size,
            "rows": rows}  # fmt: skip


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    env, models = result["environment"], result["models"]
    lines = [f"## CMAL speed ({env['date']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, {env['device']} ({env['device_name']}), "
             f"{env['threads']} threads, {env['dtype']}; batch {result['batch_size']} x {result['num_regions']} regions x "
             f"{result['text_len']} tokens; median of {result['steps']} interleaved steps after {result['warmup']} warm-up; "
             f"matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s", "",
             "| model | depth | parameters |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {m['depth']} | {m['params'] / 1e6:.1f} M |" for name, m in models.items()]
    lines += ["", "| model | mode | attention | grad ckpt | samples/s | CMAL/peer speed | peak MiB | peak act MiB | "
              "CMAL/peer mem | GFLOP/sample | MFU |", "|" + "---|" * 11]  # fmt: skip
    mib = lambda value: None if value is None else value / 2**20  # noqa: E731
    for row in result["rows"]:
        head = f"| {row['model']} | {row['mode']} | {row['attention']} | {'on' if row['checkpointing'] else 'off'} |"
        if not row["supported"]:
            lines.append(head + " n/a |" * 7)
            continue
        lines.append(
            f"{head} {row['samples_per_s']:.2f} | {fmt(row.get('cmal_speed_ratio'), '.2f')} | "
            f"{mib(row['peak_total']):.0f} | {fmt(mib(row['peak_activations']), '.0f')} | "
            f"{fmt(row.get('cmal_memory_ratio'), '.2f')} | {row['flops_per_sample'] / 1e9:.2f} | {row['mfu']:.1%} |"
        )
    lines += ["", f"Gradient checkpointing cuts CMAL's training activation memory (eager) by "
              f"{result['cmal_checkpointing_saving']:.1%}."]  # fmt: skip
    adaptive = result.get("adaptive")
    if adaptive:
        lines += ["", f"Adaptive regions (10-100 per image, COCO-like captions, half ITM negatives; {adaptive['batches']} "
                  f"batches of {adaptive['batch_size']} spread over an epoch of {adaptive['examples']} examples; eager "
                  "attention):", "",
                  "| model | batching | padding-free | samples/s | padded FLOP share | real GFLOP/sample (fwd) | "
                  "speed vs VisualBERT at equal FLOPs |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {row['model']} | {row['scheme']} | {'yes' if row['padding_free'] else 'no'} | "
                  f"{row['samples_per_s']:.2f} | {row['padded_flop_share']:.1%} | "
                  f"{row['real_flops_per_sample'] / 1e9:.2f} | {row['speed_at_equal_flops_vs_visualbert']:.2f}x |"
                  for row in adaptive["rows"]]  # fmt: skip
    data = result.get("data_pipeline")
    if data:
        lines += ["", f"Data pipeline (training/pretrain.py, batch {data['batch_size']}, {data['num_workers']} workers): "
                  f"{data['data_samples_per_s']:.0f} samples/s vs {data['model']} training {data['train_samples_per_s']:.1f} "
                  f"samples/s: ratio {data['ratio']:.1f}x (goal >= 10x)."]  # fmt: skip
    return "\n".join(lines)


def benchmark(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    defaults = CMALConfig()
    models = build_models(args.size, defaults.visual_feat_dim)
    for entry in models.values():
        entry["model"].to(device=device, dtype=dtype)
    batch = make_batch(args, defaults.vocab_size, defaults.visual_feat_dim, defaults.num_concepts, device, dtype)
    # A shared machine's speed drifts: the peak is the best matmul before and after the models, so that
    # model FLOPs utilisation is never flattered by a slow moment of the peak measurement.
    size = 8192 if device.type == "cuda" else 2048
    peak_before = matmul_peak(device, dtype, size)
    rows = measure(args, models, batch, device)
    peak_flops = max(peak_before, matmul_peak(device, dtype, size))
    for row in rows:
        if row["supported"]:
            row["mfu"] = row["flops_per_sample"] * row["samples_per_s"] / peak_flops
    result = {
        "environment": environment(args), "size": args.size, "batch_size": args.batch_size,
        "num_regions": args.num_regions, "text_len": args.text_len, "steps": args.steps, "warmup": args.warmup,
        "matmul_peak_flops": peak_flops,
        "models": {name: {"depth": m["depth"], "params": m["params"]} for name, m in models.items()},
        "rows": rows, "cmal_checkpointing_saving": checkpointing_saving(rows),
    }  # fmt: skip
    if args.adaptive_examples:
        result["adaptive"] = measure_adaptive(args, models, device, dtype)
    if not args.no_data:
        result["data_pipeline"] = time_data_pipeline(args, device)
    return result


def main(argv=None):
    args = parse_args(argv)
    result = benchmark(args)
    print(markdown(result))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
