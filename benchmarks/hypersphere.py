"""What the hypersphere does to a pre-trained model: the norms of the uni-modal features that reach it.

    python benchmarks/hypersphere.py outputs/cmal-mini-synthetic

Runs one validation batch of the synthetic world (the clean pass: no masking, no swap) and prints, per
modality, the mean and spread of the per-position norms entering `CMALHypersphere` (padding excluded) and
the sphere's radius. After a LayerNorm (`unimodal_final_layer_norm=True`) the spread is a fraction of a
percent and the sphere only rescales; without it the sphere is what puts both modalities on one scale.
"""

import argparse

import torch
from accelerate import Accelerator

from cmal import CMALProcessor
from cmal.modeling_cmal import CMALForPreTraining
from cmal.training import pretrain, pretrain_run


def sphere_inputs(folder: str, synthetic_images: int = 2000, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{modality: {"mean", "std", "radius"}} of the norms entering each hypersphere on one validation batch."""
    model = CMALForPreTraining.from_pretrained(folder).eval()
    args = pretrain.parse_args(["--per_device_train_batch_size", str(batch_size), "--synthetic_images", str(synthetic_images),
                                "--mlm_probability", "0", "--mrm_probability", "0"])  # the clean pass: nothing masked
    corpus = pretrain_run.load_corpus(args)
    loader = pretrain_run.validation_loader(args, pretrain_run.validation_pairs(corpus), CMALProcessor.from_pretrained(folder),
                                        Accelerator(cpu=True), negative_probability=0.0)  # fmt: skip
    batch = next(iter(loader))
    seen = {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output goes on unchanged
            seen[name] = inputs[0].norm(dim=-1)

        return hook

    hooks = [getattr(model.cmal, f"{name}_encoder").hypersphere.register_forward_hook(keep(name)) for name in ("text", "visual")]
    with torch.no_grad():
        model.cmal(**{k: v for k, v in batch.items() if k not in ("labels", "masked_regions", "itm_labels")},
                   anchor_selection=torch.zeros(len(batch["input_ids"]), model.config.num_concepts, dtype=torch.bool))  # fmt: skip
    for hook in hooks:
        hook.remove()
    masks = {"text": batch["attention_mask"], "visual": batch["visual_attention_mask"]}
    result = {}
    for name, norms in seen.items():
        kept = norms[masks[name].bool()]
        scale = getattr(model.cmal, f"{name}_encoder").hypersphere.scale
        result[name] = {"mean": kept.mean().item(), "std": kept.std().item(), "radius": None if scale is None else scale.item()}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="A pre-trained CMAL folder (pretrain.py's output) of the synthetic world.")
    parser.add_argument("--synthetic_images", type=int, default=2000, help="The size of the world it was trained on.")
    args = parser.parse_args(argv)
    result = sphere_inputs(args.folder, args.synthetic_images)
    for name, row in result.items():
        radius = "no sphere" if row["radius"] is None else f"radius {row['radius']:.2f}"
        print(f"{name}: norms before the sphere {row['mean']:.2f} ± {row['std']:.2f} "
              f"({100 * row['std'] / row['mean']:.1f}%), {radius}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
