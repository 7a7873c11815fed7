"""Is every task learnable at the study's fine-tuning budget? A small model learns each task from scratch on the
region oracle's symbolic inputs; how much of the gap between floor and ceiling does it close in the budget?

    python benchmarks/learnability.py                          # all five tasks, 2,000 steps at batch 32: ~20 min, 1 thread
    python benchmarks/learnability.py --tasks rec --steps 4000 --learning_rate 3e-3

The objective study (`benchmarks/objectives.py`) fine-tunes for its `--finetune_steps` at batch 32 (and measures
learnability at that budget) and reads each task as the share of the gap between its floor and the region
oracle's ceiling a model closes (`benchmarks/floors.py`).
A pre-trained model that closes little of a gap says something about pre-training only if the gap can be closed
in that budget at all. Here the inputs are the oracle's own: the text as word tokens and every confident region
as one token, the sum of embeddings of its shape and colour (read by `floors.TrainedReader`), its size and a
Linear of its box (normalised, with its centre). A word that names a shape, a colour or a size adds the embedding
of the attribute it names, so words start grounded, as pre-training is meant to leave them, and what is left to
learn is the task's logic. [CLS] text [SEP] regions go through a transformer encoder the size of the study's
`mini` model (width 128, 4 heads, 4 layers) with learned positions for the text and a type per segment (text,
the image or the left one, the right one). Heads: VQA a classifier over the answer vocabulary, VE 3-way, NLVR2
2-way over both images' regions, REC a score per region token (softmax over the image's regions), retrieval a
match classifier trained on captions with their own image or, half the time, a contrast twin the caption is not
true of (else another training image) and scored as text->image R@1 over the split's first 50 images, as finetune.py
scores it. AdamW, 100 warmup steps then cosine to 0, evaluated on `--split` every `--eval_every` steps.

A task whose gap this model closes by less than `LEARNABLE` within the budget, from inputs already read for it,
needs a longer budget (or a different recipe) before a fine-tuned CMAL's score on it can be compared.
"""

import argparse
import math
import re
import time

import floors  # benchmarks/floors.py, beside this script
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmal.training.data import synthetic
from cmal.training.tasks import TASKS
from cmal.training.data.files import write_json


TASK_NAMES = tuple(TASKS)
LEARNABLE = 0.7  # share of the gap closed at the end of the budget that counts as learnable
PAD, UNK, CLS, SEP = range(4)
MAX_TEXT = 40  # word tokens, [CLS] and [SEP] included (finetune.py's --max_text_length)
# The study's `mini` model's width, heads and feed-forward size, and its four layers (one text or region layer and
# two unified ones on each path, over four layers' weights) in one stack.
WIDTH, HEADS, LAYERS, WARMUP = 128, 4, 4, 100


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^a-z0-9 ]", text.lower())


def vocabulary(world: dict) -> dict[str, int]:
    """Word -> id over the train split's texts of every task, after the four special tokens."""
    seen = sorted({w for task in TASKS.values() for text in task.synthetic_data(world)["train"][task.text_column]
                   for w in words(text)})  # fmt: skip
    return {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *seen])}


# What a region's attributes and the words naming them embed as: the shapes (in concept-id order), colours, sizes.
SYMBOLS = [*synthetic.SHAPES, *synthetic.COLOURS, *synthetic.SIZES]
NUM_SYMBOLS = len(SYMBOLS)  # also the id of "names no attribute"


def word_symbols(vocab: dict) -> torch.Tensor:
    """Each word's `SYMBOLS` id (a shape by any of its names, a colour or a size), else `NUM_SYMBOLS`."""
    lexicon = synthetic.synthetic_lexicon()
    out = torch.full((len(vocab),), NUM_SYMBOLS)
    for word, i in vocab.items():
        shape = lexicon.concept_of(word)
        out[i] = shape if shape >= 0 else SYMBOLS.index(word) if word in SYMBOLS else NUM_SYMBOLS
    return out


def encode_texts(texts: list[str], vocab: dict) -> torch.Tensor:
    """[n, longest] ids of [CLS] words [SEP], padded with [PAD]."""
    ids = [[CLS, *(vocab.get(w, UNK) for w in words(text))][: MAX_TEXT - 1] + [SEP] for text in texts]
    out = torch.full((len(ids), max(map(len, ids))), PAD)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
    return out


def region_tokens(world: dict, reader: floors.RegionReader) -> dict[str, torch.Tensor]:
    """Every image's confident regions as the oracle reads them, in region-store order, padded to MAX_OBJECTS
    slots (`present` marks the real ones): the `SYMBOLS` ids of their shape, colour and size, and x1 y1 x2 y2 cx
    cy in [0, 1]."""
    image_ids, k = world["regions"]["image_id"], synthetic.MAX_OBJECTS
    out = {name: torch.zeros(len(image_ids), k, dtype=torch.long) for name in ("shape", "colour", "size")}
    out["box"], out["present"] = torch.zeros(len(image_ids), k, 6), torch.zeros(len(image_ids), k, dtype=torch.bool)
    for i, image_id in enumerate(image_ids):
        for j, o in enumerate(reader.images[image_id][:k]):
            for name in ("shape", "colour", "size"):
                out[name][i, j] = SYMBOLS.index(getattr(o, name))
            out["present"][i, j] = True
            out["box"][i, j] = torch.tensor([*o.box, *o.centre], dtype=torch.float32) / synthetic.IMAGE_SIZE
    return out


def points_at_a_region(world: dict, task) -> bool:
    """The task's target is one of the image's regions (no class, no match): the head scores each region."""
    return not task.negatives and task.text_labels(task.synthetic_data(world)["train"]) is None


def examples(world: dict, task, split: str, vocab: dict, reader: floors.RegionReader, per_region: bool) -> dict:
    """{"text": [n, T], "images": [n, 1 or 2] region-store rows, "label": [n]} of a task's split. A region's label
    is the target's slot among its image's confident regions (-100, never right, where it is not one of them);
    a matching task's rows are all positives (`Pairs` draws the negatives); a class is its index (VQA: in the
    world's answer vocabulary)."""
    items = task.synthetic_data(world)[split]
    row_of = {image_id: row for row, image_id in enumerate(world["regions"]["image_id"])}
    if task.negatives:
        labels = [1] * len(items)
    elif per_region:
        slots = [[o.row for o in reader.images[image_id]] for image_id in items["image_id"]]
        labels = [rows.index(t) if t in rows else -100 for rows, t in zip(slots, items["target_index"])]
    else:
        labels = task.text_labels(items)
        answers = world["world"]["answer_vocabulary"]
        labels = [answers.index(label) if isinstance(label, str) else label for label in labels]
    images = [[row_of[image_id] for image_id in ids] for ids in zip(*(items[c] for c in task.image_columns))]
    return {"text": encode_texts(items[task.text_column], vocab), "images": torch.tensor(images), "label": torch.tensor(labels)}


class Pairs:
    """Retrieval's training pairs: a caption with its own image (label 1) or, half the time, a negative (label
    0): one of its image's contrast twins the caption is not true of, else another training image it is not
    true of (10 draws), as pre-training's ITM draws them (`MatchingPairs`)."""

    def __init__(self, world: dict):
        self.twins = synthetic.twin_rows(world["regions"]["image_id"])
        self.true_of = synthetic.caption_truth(world)
        row_of = {image_id: row for row, image_id in enumerate(world["regions"]["image_id"])}
        self.train_rows = sorted({row_of[image_id] for image_id in world["captions"]["train"]["image_id"]})

    def __call__(self, texts: list[str], own: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = own.clone(), torch.ones(len(own), dtype=torch.long)
        for i, (text, row) in enumerate(zip(texts, own[:, 0].tolist())):
            if rng.random() < 0.5:
                continue
            candidates = [r for r in self.twins(row) if not self.true_of(text, r)]
            for _ in range(10):
                if candidates:
                    break
                other = int(rng.choice(self.train_rows))
                candidates = [other] if other != row and not self.true_of(text, other) else []
            if candidates:
                rows[i, 0], labels[i] = int(rng.choice(candidates)), 0
        return rows, labels


class Reader(nn.Module):
    """[CLS] text [SEP] regions through a small transformer encoder; the head reads [CLS], or each region token
    for REC."""

    def __init__(self, vocab: dict, outputs: int, dropout: float):
        super().__init__()
        self.word, self.position, self.segment = nn.Embedding(len(vocab), WIDTH), nn.Embedding(MAX_TEXT, WIDTH), nn.Embedding(3, WIDTH)
        self.symbol, self.box = nn.Embedding(NUM_SYMBOLS + 1, WIDTH, padding_idx=NUM_SYMBOLS), nn.Linear(6, WIDTH)
        self.register_buffer("word_symbol", word_symbols(vocab), persistent=False)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, outputs)

    def forward(self, text, images, regions, per_region: bool = False):
        """Logits [B, outputs], or with `per_region` [B, slots] (-inf on empty slots)."""
        r = {name: value[images].flatten(1, 2) for name, value in regions.items()}  # the images' slots side by side
        segment = torch.arange(1, images.shape[1] + 1).repeat_interleave(synthetic.MAX_OBJECTS)  # 1: the (left) image, 2: the right
        x = torch.cat([self.word(text) + self.symbol(self.word_symbol[text]) + self.position(torch.arange(text.shape[1]))
                       + self.segment(torch.zeros_like(text)),
                       self.symbol(r["shape"]) + self.symbol(r["colour"]) + self.symbol(r["size"]) + self.box(r["box"])
                       + self.segment(segment)], 1)  # fmt: skip
        hidden = self.norm(self.encoder(x, src_key_padding_mask=torch.cat([text == PAD, ~r["present"]], 1)))
        if per_region:
            return self.head(hidden[:, text.shape[1]:]).squeeze(-1).masked_fill(~r["present"], -math.inf)
        return self.head(hidden[:, 0])


def trimmed(text: torch.Tensor) -> torch.Tensor:
    """A batch's text without the columns that are padding in every row."""
    return text[:, : int((text != PAD).sum(1).max())]


@torch.no_grad()
def score(model: Reader, task, data: dict, regions: dict, per_region: bool, retrieval_truth=None, batch_size: int = 256) -> float:
    """Accuracy on `data`; a matching task: text->image R@1 of every caption against the images of
    `retrieval_truth` (images, the index of each caption's own), ranked by match log-probability."""
    model.eval()
    if task.negatives:
        images, truth = retrieval_truth
        text = data["text"].repeat_interleave(len(images), 0)
        rows = images.repeat(len(data["text"]))[:, None]
        logits = torch.cat([model(trimmed(text[i : i + batch_size]), rows[i : i + batch_size], regions)
                            for i in range(0, len(text), batch_size)])  # fmt: skip
        model.train()
        return floors._recall_at_1(logits.log_softmax(-1)[:, 1].view(-1, len(images)).numpy(), truth)
    predicted = torch.cat([model(trimmed(data["text"][i : i + batch_size]), data["images"][i : i + batch_size], regions,
                                 per_region=per_region).argmax(-1) for i in range(0, len(data["label"]), batch_size)])  # fmt: skip
    model.train()
    return float((predicted == data["label"]).float().mean())


def learn(world: dict, task, args, vocab: dict, reader: floors.RegionReader, regions: dict) -> list[dict]:
    """Train a fresh `Reader` on the task's train split; its learning curve [{"step", "score"}] on `args.split`."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    per_region = points_at_a_region(world, task)
    train = examples(world, task, "train", vocab, reader, per_region)
    retrieval_truth = pairs = None
    if not task.negatives:
        evaluation = examples(world, task, args.split, vocab, reader, per_region)
    else:
        images, captions = floors.retrieval_items(world, args.split)
        row_of = {image_id: row for row, image_id in enumerate(world["regions"]["image_id"])}
        retrieval_truth = (torch.tensor([row_of[image_id] for image_id in images]), [images.index(c["image_id"]) for c in captions])
        evaluation = {"text": encode_texts([c["text"] for c in captions], vocab)}
        pairs, train_texts = Pairs(world), world["captions"]["train"]["text"]
    # one score per region token, or a logit per class (VQA: per answer of the world)
    width = 1 if per_region else len(task.class_names) or len(world["world"]["answer_vocabulary"])
    model = Reader(vocab, width, args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / WARMUP, 0.5 * (1 + math.cos(
        math.pi * max(step - WARMUP, 0) / max(args.steps - WARMUP, 1)))))  # fmt: skip
    n = len(train["label"])
    order = np.concatenate([rng.permutation(n) for _ in range(args.steps * args.batch_size // n + 1)])
    curve = []
    for step in range(1, args.steps + 1):
        batch = torch.from_numpy(order[(step - 1) * args.batch_size : step * args.batch_size])
        images, labels = train["images"][batch], train["label"][batch]
        if pairs is not None:
            images, labels = pairs([train_texts[i] for i in batch.tolist()], images, rng)
        logits = model(trimmed(train["text"][batch]), images, regions, per_region=per_region)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "score": score(model, task, evaluation, regions, per_region, retrieval_truth)})
    return curve


def markdown(results: dict, split: str) -> str:
    steps = [point["step"] for point in next(iter(results.values()))["curve"]]
    lines = [f"| task ({split}) | floor | oracle | " + " | ".join(f"step {s}" for s in steps) + " | gap closed | seconds |",
             "|---" * (len(steps) + 5) + "|"]  # fmt: skip
    for task, r in results.items():
        curve = " | ".join(f"{point['score']:.3f}" for point in r["curve"])
        lines.append(f"| {task} | {r['floor']:.3f} | {r['oracle']:.3f} | {curve} | {r['gap_closed']:.0%} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def verdict(task: str, r: dict, steps: int) -> str:
    learnable = "learnable at this budget" if r["learnable"] else f"not learnable at this budget (< {LEARNABLE:.0%})"
    return f"{task}: {r['gap_closed']:.0%} of the gap closed in {steps} steps: {learnable}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the world and of training.")
    parser.add_argument("--split", default="validation", choices=["validation", "test"], help="Where the curve is scored.")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--steps", type=int, default=2000, help="The budget (objectives.py passes its --finetune_steps).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads: the budget is timed on one.")
    parser.add_argument("--output", default=None, help="Also write the results as JSON here.")
    return parser.parse_args(argv)


def measure(world: dict, table: dict, trained: floors.TrainedReader, args: argparse.Namespace) -> dict:
    """Per task of `args.tasks`: floor, oracle (from `table`, `floors.floors` of `args.split`), the learning
    curve, its last score, the gap it closes and whether that is learnable."""
    torch.set_num_threads(args.threads)
    reader = floors.RegionReader(world, trained)
    vocab, regions = vocabulary(world), region_tokens(world, reader)
    results = {}
    for task in args.tasks:
        start = time.perf_counter()
        curve = learn(world, TASKS[task], args, vocab, reader, regions)
        row, final = table[task], curve[-1]["score"]
        gap = floors.gap_closed(final, row)
        results[task] = {"floor": floors.floor(row), "oracle": row["region oracle"], "curve": curve, "score": final,
                         "gap_closed": gap, "learnable": gap >= LEARNABLE, "seconds": time.perf_counter() - start}  # fmt: skip
    return results


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    world = synthetic.load_world(synthetic.default_world(num_images=args.num_images, seed=args.seed))
    trained = floors.TrainedReader(world)
    table = floors.floors(world, args.split, trained)
    print(f"floors and ceilings: {time.perf_counter() - start:.0f} s", flush=True)
    results = measure(world, table, trained, args)
    print(markdown(results, args.split))
    print("\n".join(verdict(task, r, args.steps) for task, r in results.items()))
    if args.output:
        write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
