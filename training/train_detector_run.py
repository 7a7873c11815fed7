"""What `training/train_detector.py` runs once its arguments are parsed: the detector's config and processor,
fresh training scenes, the attribute head, COCO mAP and attribute accuracy on the world's validation images, and
the run, through the shared training loop. The command line stays in `train_detector.py`, which imports this
module only after parsing, so its `--help` answers without torch.
"""

import contextlib
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher
from transformers.utils import ModelOutput

from cmal.training.arguments import TrainingRun
from cmal.training.data import synthetic
from cmal.training.data.epochs import TrainingData
from cmal.training.data.files import write_json
from cmal.training.loop import train
from cmal.training.run_folder import final_folder, resume_hint_on_interrupt
from cmal.training.runtime import finish, loader_options, prepare_training, setup_accelerator


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


@dataclass
class DetectorTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    detection_loss: torch.Tensor | None = None
    attribute_loss: torch.Tensor | None = None


class DetectorTraining(nn.Module):
    """The detector and its attribute head as one module, so the shared loop trains them as it trains CMAL: one
    loss, one optimizer over both, one checkpoint."""

    def __init__(self, detector: RTDetrForObjectDetection, attributes: AttributeHead, attribute_loss_weight: float):
        super().__init__()
        self.detector, self.attributes, self.attribute_loss_weight = detector, attributes, attribute_loss_weight

    def forward(self, pixel_values, labels) -> DetectorTrainingOutput:
        outputs = self.detector(pixel_values=pixel_values, labels=labels)
        attribute_loss = self.attributes.loss(outputs, labels)
        return DetectorTrainingOutput(loss=outputs.loss + self.attribute_loss_weight * attribute_loss,
                                      detection_loss=outputs.loss, attribute_loss=attribute_loss)  # fmt: skip


class FreshScenes(TrainingData, Dataset):
    """`size` scenes drawn from the world's generator, scene i a function of (seed, i) only, with seeds no world
    image uses; read in order, batch `step` holds scenes step * batch_size onwards."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def __len__(self):
        return self.size

    def __getitem__(self, index: int):
        return pixels_and_target(synthetic.generate_scene(np.random.default_rng([self.seed, index, DETECTOR_STREAM])))


def collate_scenes(items) -> dict:
    pixels, targets = zip(*items)
    return {"pixel_values": torch.stack(pixels), "labels": list(targets)}


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
    training = TrainingRun.from_args(args)
    accelerator = setup_accelerator(training)
    with resume_hint_on_interrupt(training, accelerator):
        with accelerator.main_process_first():
            world = synthetic.load_world(synthetic.default_world(num_images=args.synthetic_images, seed=args.synthetic_seed))
        scenes = validation_scenes(world)
        config = detector_config()
        model = DetectorTraining(RTDetrForObjectDetection(config), AttributeHead(config), args.attribute_loss_weight)
        data = FreshScenes(args.seed, args.max_train_steps * args.per_device_train_batch_size * accelerator.num_processes)
        # its own generator: a new iterator (a resumed run makes one) must not draw from, and shift, the global RNG that
        # RT-DETR's denoising queries draw from
        loader = DataLoader(data, batch_size=args.per_device_train_batch_size, collate_fn=collate_scenes,
                            generator=torch.Generator().manual_seed(args.seed), **loader_options(args.num_workers))  # fmt: skip
        logger.info(f"{sum(p.numel() for p in model.detector.parameters()) / 1e6:.2f} M parameters, {args.max_train_steps} "
                    f"steps of {args.per_device_train_batch_size} fresh scenes; validation: {len(scenes)} world images")  # fmt: skip
        model, optimizer, loader, scheduler, max_steps = prepare_training(accelerator, training, model, loader, "cmal_detector")
        results = train(accelerator, training, model, optimizer, scheduler, loader, max_steps,
                        ("loss", "detection_loss", "attribute_loss"), "training the detector")  # fmt: skip
        trained = accelerator.unwrap_model(model)
        results["validation"] = validation = evaluate(trained.detector, trained.attributes, scenes, accelerator.device)
        if accelerator.is_main_process:
            print(f"held-out mAP@0.5 {validation['map_50']:.3f}, mAP@[.5:.95] {validation['map_50_95']:.3f}, colour "
                  f"{validation['colour_accuracy']:.3f} and size {validation['size_accuracy']:.3f} read off the matched queries "
                  f"({len(scenes)} validation images of the world; {results['train_seconds']:.0f} s of training)")  # fmt: skip
            with final_folder(args.output_dir) as folder:
                trained.detector.save_pretrained(folder)
                image_processor().save_pretrained(folder)
                write_json(os.path.join(folder, "eval_results.json"), {
                    "validation": validation, "train_seconds": round(results["train_seconds"], 1),
                    "final_loss": results["final_losses"]["loss"], "args": vars(args)})  # fmt: skip
    finish(accelerator)
    return results
