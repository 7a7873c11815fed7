"""One forward and backward pass of a tiny, untrained CMAL on a hand-made scene.

The scene: "two dogs near a cat" with four detected regions (dog, person, cat, dog). The words
"dogs" and "cat" are anchor points: concepts that are both a region tag and a word. The script
shows what the anchor operator finds, which slots the associative prompt layer swaps, and the
loss of every pre-training objective. Region features are random: the model is untrained.

    python examples/forward_tiny.py
"""

import torch

from cmal.modeling_cmal import COCO_CONCEPT_NAMES, CMALConfig, CMALForPreTraining


torch.manual_seed(0)
config = CMALConfig.from_preset("tiny", vocab_size=16, visual_feat_dim=64, anchor_mask_prob=1.0)
model = CMALForPreTraining(config)

vocab = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "two", "dog", "##s", "near", "a", "cat"]
words = ["[CLS]", "two", "dog", "##s", "near", "a", "cat", "[SEP]"]
input_ids = torch.tensor([[vocab.index(w) for w in words]])
concept = {name: i for i, name in enumerate(COCO_CONCEPT_NAMES)}
# The processor's anchor lexicon does this (plurals, synonyms, word pieces); here it is by hand.
token_concept_ids = torch.tensor([[-1, -1, concept["dog"], concept["dog"], -1, -1, concept["cat"], -1]])
region_tags = ["dog", "person", "cat", "dog"]
region_concept_ids = torch.tensor([[concept[t] for t in region_tags]])
boxes = torch.tensor([[[0.1, 0.5, 0.3, 0.9], [0.4, 0.1, 0.6, 0.9], [0.7, 0.6, 0.9, 0.9], [0.3, 0.5, 0.45, 0.8]]])
width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
visual_pos = torch.cat([boxes, width[..., None], height[..., None], (width * height)[..., None]], dim=-1)

labels = torch.full_like(input_ids, -100)
labels[0, 4], input_ids[0, 4] = input_ids[0, 4], vocab.index("[MASK]")  # MLM on "near"
outputs = model(
    input_ids=input_ids,
    visual_feats=torch.randn(1, 4, 64),
    visual_pos=visual_pos,
    token_concept_ids=token_concept_ids,
    region_concept_ids=region_concept_ids,
    region_scores=torch.tensor([[0.6, 0.9, 0.8, 0.95]]),
    labels=labels,
    masked_regions=torch.tensor([[False, True, False, False]]),
    itm_labels=torch.tensor([1]),
)
outputs.loss.backward()

print(f"CMAL tiny: {sum(p.numel() for p in model.parameters()):,} parameters")
print("anchor points (token -> regions):")
for t, r in outputs.anchor_map[0].nonzero().tolist():
    print(f"  {words[t]:>5} (token {t}) <-> {region_tags[r]} (region {r})")
print("swapped token slots:", [words[t] for t in outputs.token_swapped[0].nonzero().flatten().tolist()])
print("swapped region slots:", [region_tags[r] for r in outputs.region_swapped[0].nonzero().flatten().tolist()])
for name in ("mlm_loss", "mrm_feature_loss", "mrm_concept_loss", "itm_loss", "amc_token_loss", "amc_region_loss",
             "amc_pointer_loss"):  # fmt: skip
    print(f"{name:>17}: {outputs[name].item():.4f}")
print(f"{'total loss':>17}: {outputs.loss.item():.4f} (backward done)")
