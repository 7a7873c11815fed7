"""Draw what CMAL sees: its regions, the anchor points linking them to words, and where [CLS] looks.

Anchor points are concepts that are both a region's tag and a word of the text; the associative
prompt layer swaps features across exactly these pairs, so a picture of them shows whether the
detector tags and the anchor lexicon agree on a given image and sentence. The bars show the
attention of the unified encoder's [CLS] token over regions (last layer, heads averaged): the
regions the pooled answer is read from.

    python examples/visualize_anchors.py --model CHECKPOINT --image photo.jpg --text "a man holding a cup"
    python examples/visualize_anchors.py --synthetic_index 3      # a scene of the synthetic world, pre-trained model

`--image` needs a checkpoint with a detector; `--synthetic_index` takes the regions of the synthetic
world's region store (the world `training/pretrain.py` builds by default) and re-renders the scene.
`draw_anchors` uses Pillow only, so the Gradio Space reuses it.
"""

import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoModel, AutoProcessor


# Distinct, saturated colours (Trubetskoy's list): region i gets PALETTE[i % 12].
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]  # fmt: skip
PANEL_WIDTH = 350  # the [CLS] attention bars, right of the picture
LABEL_WIDTH = 160  # of a region's tag beside its bar
LINK_GAP = 70  # between the picture and the words: room for the link lines to fan out
ROW = 24  # height of one bar or one row of words
MAX_FILL = 90  # box fill alpha of the region [CLS] attends to most


def _text_color(color):
    return (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else (255, 255, 255)


def draw_anchors(image, boxes, tags, words, links, cls_attention, side: int = 512) -> Image.Image:
    """The figure: the image scaled so its longer side is `side`, at the top left, with one coloured
    box per region (filled in proportion to its [CLS] attention); the attention bars to its right; the
    words below both, each anchor word in its region's colour with a line up to every partner region.

    boxes: (N, 4) normalised x1, y1, x2, y2; tags: N labels; words: the text's words;
    links: (word index, region index) pairs; cls_attention: N weights. Returns an RGB image of
    width `picture width + PANEL_WIDTH`.
    """
    image = image.convert("RGB")
    scale = side / max(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    boxes = [[x1 * width, y1 * height, x2 * width, y2 * height] for x1, y1, x2, y2 in np.asarray(boxes, dtype=float)]
    attention = np.asarray(cls_attention, dtype=float)
    peak = max(float(attention.max(initial=0.0)), 1e-12)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    small, large = ImageFont.load_default(size=14), ImageFont.load_default(size=20)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    # Layout: words below the picture and the bars, wrapped to the figure's width.
    bars_bottom = 40 + ROW * len(boxes)
    places, x, y = [], 8, max(height, bars_bottom) + LINK_GAP
    space = measure.textlength(" ", font=large)
    for word in words:
        word_width = measure.textlength(word, font=large)
        if places and not any(c.isalnum() for c in word):  # punctuation sits on the word before it
            x -= space
        elif x + word_width > width + PANEL_WIDTH - 8 and x > 8:
            x, y = 8, y + ROW + 8
        places.append((x, y, word_width))
        x += word_width + space
    canvas = Image.new("RGB", (width + PANEL_WIDTH, (y + ROW + 8 if words else max(height, bars_bottom)) + 8), "white")

    picture = image.resize((width, height), Image.LANCZOS).convert("RGBA")
    fill = Image.new("RGBA", picture.size)
    fill_draw = ImageDraw.Draw(fill)
    for box, color, weight in zip(boxes, colors, attention):
        fill_draw.rectangle(box, fill=(*color, int(MAX_FILL * weight / peak)))
    canvas.paste(Image.alpha_composite(picture, fill).convert("RGB"))
    draw = ImageDraw.Draw(canvas)
    for box, color in zip(boxes, colors):
        draw.rectangle(box, outline=color, width=3)

    partners = {}
    for w, r in sorted(links):
        partners.setdefault(w, []).append(r)
    for w, regions in partners.items():
        x, y, word_width = places[w]
        for r in regions:
            x1, _, x2, y2 = boxes[r]
            box_bottom = ((min(max(x1, 0), width) + min(max(x2, 0), width)) / 2, min(max(y2, 0), height - 1))
            draw.line([(x + word_width / 2, y - 2), box_bottom], fill=colors[r], width=2)

    placed = []  # tag labels over boxes and lines; a label over another one moves down (wrapping to the top)
    for box, color, tag in zip(boxes, colors, tags):
        label_width = measure.textlength(tag, font=small) + 8
        left, top = min(max(box[0], 0), max(width - label_width, 0)), min(max(box[1], 0), height - 20)
        for _ in range(height // 20):
            if not any(left < r and left + label_width > l and top < b and top + 20 > t for l, t, r, b in placed):
                break
            top = top + 20 if top + 40 <= height else 0
        placed.append((left, top, left + label_width, top + 20))
        draw.rectangle(placed[-1], fill=color)
        draw.text((left + 4, top + 2), tag, fill=_text_color(color), font=small)

    for w, (word, (x, y, word_width)) in enumerate(zip(words, places)):
        color = colors[partners[w][0]] if w in partners else (70, 70, 70)
        draw.text((x, y), word, fill=color, font=large)
        if w in partners:
            draw.line([(x, y + ROW), (x + word_width, y + ROW)], fill=color, width=2)

    left = width + 12  # [CLS] attention bars, one per region, in the regions' colours
    draw.text((left, 8), "[CLS] attention, last layer", fill=(0, 0, 0), font=small)
    bar_left = left + 18 + LABEL_WIDTH
    bar_length = width + PANEL_WIDTH - bar_left - 56
    for i, (color, tag, weight) in enumerate(zip(colors, tags, attention)):
        top = 36 + ROW * i
        draw.rectangle((left, top + 3, left + 12, top + 15), fill=color)
        label = tag
        while measure.textlength(label, font=small) > LABEL_WIDTH - 6:
            label = label[:-2] + "…"
        draw.text((left + 18, top + 1), label, fill=(0, 0, 0), font=small)
        draw.rectangle((bar_left, top + 3, bar_left + max(1, round(bar_length * weight / peak)), top + 15), fill=color)
        draw.text((bar_left + bar_length + 6, top + 1), f"{weight:.3f}", fill=(0, 0, 0), font=small)
    return canvas


@torch.no_grad()
def explain(model, processor, text: str, image=None, regions=None, max_regions: int = 10) -> dict:
    """One forward pass of the encoder (`output_attentions=True`) -> the arguments of `draw_anchors`.

    `model` is any CMAL model (the encoder of a task head is used), `image` a PIL image (the
    checkpoint's detector finds the regions) or `regions` one image's precomputed region dict.
    Drawn: the best `max_regions` regions by score, plus every region that is an anchor partner.
    """
    encoder = model.base_model.eval()
    batch = processor(text=text, **({"images": [image]} if regions is None else {"regions": [regions]}))
    outputs = encoder(**batch, output_attentions=True)
    text_len = batch["input_ids"].shape[1]
    cls_attention = outputs.attentions[-1][0, :, 0, text_len:].float().mean(0)

    # Words from the text itself (not the vocabulary: a word-level vocabulary turns unknown words into [UNK]).
    encoding = processor.tokenizer(text, truncation=True, return_offsets_mapping=True)
    word_ids, spans = encoding.word_ids(), {}
    for w, (start, end) in zip(word_ids, encoding["offset_mapping"]):
        if w is not None:
            spans[w] = (spans.get(w, (start, end))[0], end)
    order = sorted(spans)
    words = [text[slice(*spans[w])] for w in order]

    anchors = outputs.anchor_map[0]  # the anchor operator's output: token t and region r share a concept
    valid = outputs.region_mask[0].nonzero().flatten().tolist()
    anchored = set(anchors.any(0).nonzero().flatten().tolist())
    shown = [r for k, r in enumerate(valid) if k < max_regions or r in anchored]
    slot = {r: i for i, r in enumerate(shown)}
    links = sorted({(order.index(word_ids[t]), slot[r]) for t, r in anchors.nonzero().tolist() if word_ids[t] is not None})

    names = model.config.concept_names
    concept_ids, scores = outputs.region_concept_ids[0], outputs.region_scores
    tags = []
    for r in shown:
        name = names[concept_ids[r]] if concept_ids[r] >= 0 else "untagged"
        tags.append(f"#{r} {name}" + ("" if scores is None else f" {scores[0, r].item():.2f}"))
    return {
        "boxes": outputs.region_boxes[0, shown].float().tolist(),
        "tags": tags,
        "words": words,
        "links": links,
        "cls_attention": cls_attention[shown].tolist(),
    }


def anchor_picture(model, processor, text: str, image, regions=None, max_regions: int = 10, side: int = 512):
    """`draw_anchors(image, **explain(...))`: the Space's one call. `image` is drawn; with `regions`
    the regions come from there instead of the detector."""
    explained = explain(model, processor, text, image=image if regions is None else None, regions=regions,
                        max_regions=max_regions)  # fmt: skip
    return draw_anchors(image, **explained, side=side)


def synthetic_scene(index: int, world_dir: str | None, synthetic_images: int, synthetic_seed: int):
    """Scene `index` of a synthetic world: (rendered image, its region dict, its first caption)."""
    from cmal.training.data import synthetic
    from cmal.training.data.region_store import row_to_regions

    world = synthetic.load_world(world_dir or synthetic.default_world(num_images=synthetic_images, seed=synthetic_seed))
    image_id = f"synthetic-{index:06d}"
    image_ids = list(world["regions"]["image_id"])
    if image_id not in image_ids:
        raise ValueError(f"--synthetic_index must be below the world's {len(image_ids)} images, got {index}")
    row = world["regions"].with_format("numpy")[image_ids.index(image_id)]
    seed = world["world"]["arguments"]["seed"]
    image = synthetic.render(synthetic.scene_of(seed, index))
    captions = [text for split in world["captions"].values() for i, text in zip(split["image_id"], split["text"]) if i == image_id]
    return image, row_to_regions(row), captions[0]


def main(argv=None) -> dict:
    """Draw one figure; returns what `explain` found (for tests and notebooks)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/cmal-mini-synthetic", help="CMAL checkpoint folder or Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a photo (path or URL); needs a checkpoint with a detector")
    source.add_argument("--synthetic_index", type=int, help="a scene of the synthetic world")
    parser.add_argument("--text", help="the sentence (default with --synthetic_index: the scene's first caption)")
    parser.add_argument("--synthetic_world", help="a built world folder (default: the one pretrain.py builds)")
    parser.add_argument("--synthetic_images", type=int, default=2000, help="size of the default world")
    parser.add_argument("--synthetic_seed", type=int, default=0, help="seed of the default world")
    parser.add_argument("--max_regions", type=int, default=10, help="regions drawn besides the anchor partners")
    parser.add_argument("--side", type=int, default=512, help="longer side of the drawn picture, in pixels")
    parser.add_argument("--output", default="anchors.png")
    args = parser.parse_args(argv)
    if args.image is not None and args.text is None:
        parser.error("--image needs --text")

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.image is not None:
        from transformers.image_utils import load_image

        image, regions, text = load_image(args.image), None, args.text
    else:
        image, regions, caption = synthetic_scene(args.synthetic_index, args.synthetic_world, args.synthetic_images,
                                                  args.synthetic_seed)  # fmt: skip
        text = args.text or caption
    explained = explain(model, processor, text, image=image if regions is None else None, regions=regions,
                        max_regions=args.max_regions)  # fmt: skip
    figure = draw_anchors(image, **explained, side=args.side)
    figure.save(args.output)
    print(f"text: {text}")
    for w, r in explained["links"]:
        print(f"anchor: {explained['words'][w]!r} <-> region {explained['tags'][r]}")
    print(f"wrote {args.output} ({figure.width}x{figure.height})")
    return explained


if __name__ == "__main__":
    main()
