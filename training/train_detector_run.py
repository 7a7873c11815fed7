"""What `training/train_detector.py` runs once its arguments are parsed: the detector's config and processor,
fresh training scenes, the attribute head, COCO mAP and attribute accuracy on the world's validation images, and
the run. The command line stays in
`train_detector.py`, which imports this module only after parsing, so its `--help` answers without torch.
"""

import contextlib
import io
import logging
import os
import time

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

from cmal.training.data import synthetic
from cmal.training.files import write_json
from cmal.training.run_folder import final_folder, recover_final_folder
from cmal.training.runtime import configure_logging, use_idle_cores


logger = logging.getLogger("cmal.training.train_detector")
DETECTOR_STREAM = 3  # synthetic.py seeds image i's streams with (seed, i, 0..2): stream 3 is no world image's
ATTRIBUTES = {"colour": list(synthetic.COLOURS), "size": list(synthetic.SIZES)}
TARGET_MAP_50 = 0.9  # the default run's 0.91: objects it misses are questions the chain cannot answer
TARGET_COLOUR_ACCURACY = 0.9  # the attribute head on matched queries: the features carry colour


def detector_config() -> RTDetrConfig:
    """RT-DETR sized for 128 x 128 scenes of 1-6 shapes: three feature levels (strides 8-32), 20 queries."""
    backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                  layer_type="basic", downsample_in_bottleneck=False,
                                  out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    return RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, use_timm_backbone=False,
        num_labels=len(synthetic.SHAPES), id2label=dict(enumerate(synthetic.SHAPES)),
        label2id={shape: i for i, shape in enumerate(synthetic.SHAPES)},
        d_model=64, encoder_hidden_dim=64, encoder_in_channels=[32, 64, 128], encoder_ffn_dim=128,
        encoder_attention_heads=4, hidden_expansion=0.5, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=128,
        decoder_attention_heads=4, decoder_layers=2, decoder_n_points=4, num_queries=20, num_denoising=20,
    )  # fmt: skip


def image_processor():
    """RT-DETR's processor doing what training does. Newer transformers name the PIL one `...Pil` (the plain name
    needs torchvision, which this CPU torch does not import beside); 5.0's plain name is the PIL one."""
    processor_class = getattr(transformers, "RTDetrImageProcessorPil", None) or transformers.RTDetrImageProcessor
    size = synthetic.IMAGE_SIZE
    return processor_class(size={"height": size, "width": size}, do_normalize=False)


def pixels_and_target(scene):
    """The rendered scene as `pixel_values` (pixels / 255, channels first) and its boxes as RT-DETR's target
    (class ids, normalised centre x, centre y, width, height)."""
    pixels = torch.from_numpy(np.asarray(synthetic.render(scene), np.float32) / 255.0).permute(2, 0, 1)
    boxes = torch.tensor([obj.box for obj in scene.objects], dtype=torch.float32) / torch.tensor(
        [scene.width, scene.height, scene.width, scene.height]
    )
    centre_size = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=1)
    labels = torch.tensor([synthetic.SHAPES.index(obj.shape) for obj in scene.objects])
    attributes = {name: torch.tensor([values.index(getattr(obj, name)) for obj in scene.objects])
                  for name, values in ATTRIBUTES.items()}  # fmt: skip
    return pixels, {"class_labels": labels, "boxes": centre_size, **attributes}


class AttributeHead(nn.Module):
    """Bottom-up attention's attribute classifier for a DETR: colour and size read linearly off the decoder
    state of each query matched to an object. Training it with the detector makes the state carry them, and
    that state is the region feature a CMAL checkpoint reads; the head itself is not saved."""

    def __init__(self, config: RTDetrConfig):
        super().__init__()
        self.matcher = RTDetrHungarianMatcher(config)
        self.num_queries = config.num_queries
        self.heads = nn.ModuleDict({name: nn.Linear(config.d_model, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, outputs, targets) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) per attribute over the matched queries. In training the outputs also hold the
        denoising queries, in front: the detection queries are the last `num_queries`."""
        logits, boxes, states = (t[:, -self.num_queries :] for t in (outputs.logits, outputs.pred_boxes, outputs.last_hidden_state))
        matches = self.matcher({"logits": logits, "pred_boxes": boxes}, targets)
        batch = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(matches)])
        matched = states[batch, torch.cat([query for query, _ in matches])]
        return {name: (head(matched), torch.cat([target[name][obj] for target, (_, obj) in zip(targets, matches)]))
                for name, head in self.heads.items()}  # fmt: skip

    def loss(self, outputs, targets) -> torch.Tensor:
        return sum(nn.functional.cross_entropy(logits, labels) for logits, labels in self(outputs, targets).values())


def training_batch(seed: int, step: int, batch_size: int):
    """Batch `step`: fresh scenes, a function of (seed, step) only."""
    scenes = [synthetic.generate_scene(np.random.default_rng([seed, step * batch_size + k, DETECTOR_STREAM]))
              for k in range(batch_size)]  # fmt: skip
    pixels, targets = zip(*map(pixels_and_target, scenes))
    return torch.stack(pixels), list(targets)


def validation_scenes(world: dict) -> list:
    """The scenes of the world's validation images (every table splits the world by image alike)."""
    image_ids = sorted(set(world["captions"]["validation"]["image_id"]))
    scenes = synthetic.world_scenes(world)
    return [scenes[int(image_id.rsplit("-", 1)[1])] for image_id in image_ids]


@torch.no_grad()
def evaluate(model, attribute_head, scenes, device, batch_size: int = 50) -> dict:
    """COCO mAP (pycocotools) over every query's box: @0.5 and @[.5:.95], in pixels of the 128 x 128 scenes; and
    the attribute head's accuracy on the queries matched to objects."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    images, annotations, detections = [], [], []
    right = {name: [] for name in ATTRIBUTES}
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        pixels, targets = zip(*map(pixels_and_target, chunk))
        outputs = model(pixel_values=torch.stack(pixels).to(device))
        targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
        for name, (logits, labels) in attribute_head(outputs, targets).items():
            right[name] += (logits.argmax(-1) == labels).tolist()
        scores, labels = outputs.logits.sigmoid().max(-1)
        for k, scene in enumerate(chunk):
            image_id = start + k
            images.append({"id": image_id, "width": scene.width, "height": scene.height})
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "area": (x2 - x1) * (y2 - y1),
                                    "category_id": synthetic.SHAPES.index(obj.shape), "bbox": [x1, y1, x2 - x1, y2 - y1]})  # fmt: skip
            cx, cy, w, h = (outputs.pred_boxes[k].cpu() * torch.tensor([scene.width, scene.height] * 2)).unbind(-1)
            for q in range(len(cx)):
                detections.append({"image_id": image_id, "category_id": int(labels[k, q]), "score": float(scores[k, q]),
                                   "bbox": [float(cx[q] - w[q] / 2), float(cy[q] - h[q] / 2), float(w[q]), float(h[q])]})  # fmt: skip
    model.train()
    categories = [{"id": i, "name": shape} for i, shape in enumerate(synthetic.SHAPES)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": categories}
        truth.createIndex()
        coco = COCOeval(truth, truth.loadRes(detections), "bbox")
        coco.evaluate(), coco.accumulate(), coco.summarize()
    return {"map_50": float(coco.stats[1]), "map_50_95": float(coco.stats[0]), "images": len(scenes),
            "objects": len(annotations), **{f"{name}_accuracy": float(np.mean(r)) for name, r in right.items()}}  # fmt: skip


def run(args) -> dict:
    """Train and evaluate with the parsed `args` of `train_detector.parse_args`; returns the results."""
    configure_logging()
    recover_final_folder(args.output_dir)  # a save cut short by a kill: back to the previous folder
    if os.path.isfile(args.output_dir) or (os.path.isdir(args.output_dir) and os.listdir(args.output_dir)
                                           and not args.overwrite_output_dir):  # fmt: skip
        raise ValueError(f"--output_dir {args.output_dir!r} is not empty: pass --overwrite_output_dir to replace it, "
                         "or choose another --output_dir")  # fmt: skip
    world = synthetic.load_world(synthetic.default_world(num_images=args.synthetic_images, seed=args.synthetic_seed))
    scenes = validation_scenes(world)
    set_seed(args.seed)
    accelerator = Accelerator()
    use_idle_cores(accelerator.device)
    config = detector_config()
    model, attribute_head = RTDetrForObjectDetection(config), AttributeHead(config)
    parameters = [*model.parameters(), *attribute_head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    model, attribute_head, optimizer = accelerator.prepare(model, attribute_head, optimizer)
    logger.info(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {args.max_train_steps} steps of "
                f"{args.per_device_train_batch_size} fresh scenes; validation: {len(scenes)} world images")  # fmt: skip
    start, losses = time.perf_counter(), []
    for step in range(args.max_train_steps):
        pixels, targets = training_batch(args.seed, step, args.per_device_train_batch_size)
        targets = [{key: value.to(accelerator.device) for key, value in target.items()} for target in targets]
        outputs = model(pixel_values=pixels.to(accelerator.device), labels=targets)
        loss = outputs.loss + args.attribute_loss_weight * attribute_head.loss(outputs, targets)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % args.logging_steps == 0:
            logger.info(f"step {step + 1}: loss {np.mean(losses[-args.logging_steps:]):.3f}")
    seconds = time.perf_counter() - start
    validation = evaluate(model, attribute_head, scenes, accelerator.device)
    results = {"validation": validation, "train_seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-args.logging_steps:]))}
    print(f"held-out mAP@0.5 {validation['map_50']:.3f}, mAP@[.5:.95] {validation['map_50_95']:.3f}, colour "
          f"{validation['colour_accuracy']:.3f} and size {validation['size_accuracy']:.3f} read off the matched queries "
          f"({len(scenes)} validation images of the world; {seconds:.0f} s of training)")  # fmt: skip
    with final_folder(args.output_dir) as folder:
        accelerator.unwrap_model(model).save_pretrained(folder)
        image_processor().save_pretrained(folder)
        write_json(os.path.join(folder, "eval_results.json"), {**results, "args": vars(args)})
    accelerator.end_training()
    return results
