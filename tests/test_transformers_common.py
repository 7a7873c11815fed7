"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) on every CMAL class.

The test files come from the source release of the installed transformers version, fetched at test
time (see `transformers_common.py`); nothing of them is copied here. `CMALModelTester` plays the part
of `BertModelTester` in transformers' `tests/models/bert/test_modeling_bert.py`.
"""

import copy
import unittest
from unittest import mock

import torch
from conftest import FEAT_DIM, NUM_CONCEPTS, VOCAB_SIZE, tiny_config
from transformers import (
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers_common import load_common_tests

from cmal.modeling_cmal import (
    CMALConfig,
    CMALForImageTextClassification,
    CMALForImageTextRetrieval,
    CMALForPreTraining,
    CMALForQuestionAnswering,
    CMALForReferringExpression,
    CMALForVisualReasoning,
    CMALModel,
)


test_modeling_common, test_configuration_common = load_common_tests()  # skips this module when unavailable
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester


# The common tests pick class-specific checks (labels, `problem_type`, mismatched heads, training, the
# `inputs_embeds` comparison...) by looking the class names up in transformers' static `*_MAPPING_NAMES`,
# which list only in-library models. CMAL registers itself with the auto classes at import instead
# (`modeling_cmal/__init__.py`), so for the duration of these tests the common-test module's copies of
# those tables get a "cmal" entry holding what the project registered: the tests then treat each
# class as transformers would treat an in-library model registered the same way.
AUTO_CLASS_TABLES = {
    AutoModel: "MODEL_MAPPING_NAMES",
    AutoModelForPreTraining: "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    AutoModelForSequenceClassification: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    AutoModelForTokenClassification: "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


def registered_names(auto_class) -> tuple[str, ...]:
    registered = auto_class._model_mapping._extra_content.get(CMALConfig, ())
    registered = registered if isinstance(registered, (tuple, list)) else (registered,)
    return tuple(model_class.__name__ for model_class in registered)


def random_boxes(batch_size: int, num_regions: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N, 7) box vectors `(x1, y1, x2, y2, w, h, area)` in [0, 1] with x1 < x2 and y1 < y2."""
    corner = torch.rand(batch_size, num_regions, 2, generator=generator) * 0.5
    size = 0.05 + torch.rand(batch_size, num_regions, 2, generator=generator) * 0.45
    boxes = torch.cat([corner, corner + size], dim=-1)
    return torch.cat([boxes, size, size.prod(-1, keepdim=True)], dim=-1)


class CMALModelTester:
    def __init__(
        self,
        parent,
        batch_size=7,  # what test_eager_matches_sdpa_inference uses: it pads a smaller batch with random, invalid boxes
        seq_length=7,
        num_regions=5,
        is_training=True,
        use_labels=True,
        vocab_size=VOCAB_SIZE,
        visual_feat_dim=FEAT_DIM,
        num_concepts=NUM_CONCEPTS,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_labels=2,  # CMALForImageTextRetrieval is a 2-way (match / no match) classifier
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length  # text length: labels of the text slots
        self.num_regions = num_regions
        # attentions and hidden states of the unified encoder run over `[CLS] text [SEP] regions`
        self.encoder_seq_length = seq_length + num_regions
        self.key_length = seq_length + num_regions
        self.is_training = is_training
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.visual_feat_dim = visual_feat_dim
        self.num_concepts = num_concepts
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers  # the unified encoder's (the uni-modal ones: 1 each)
        self.num_labels = num_labels

    def get_config(self) -> CMALConfig:
        return tiny_config(
            vocab_size=self.vocab_size,
            visual_feat_dim=self.visual_feat_dim,
            num_concepts=self.num_concepts,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_hidden_layers=self.num_hidden_layers,
            num_labels=self.num_labels,
            itc_weight=1.0,  # every pre-training loss on
        )

    def prepare_config_and_inputs(self):
        b, t, n = self.batch_size, self.seq_length, self.num_regions
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(5, self.vocab_size, (b, t), generator=g)
        input_ids[:, 0], input_ids[:, -1] = 1, 2  # [CLS], [SEP] stand-ins
        attention_mask = torch.ones(b, t, dtype=torch.long)
        attention_mask[-1, -2:] = 0  # the last example is padded: two tokens and one region
        input_ids[-1, -2:] = 0
        visual_attention_mask = torch.ones(b, n, dtype=torch.long)
        visual_attention_mask[-1, -1] = 0
        token_concept_ids = torch.full((b, t), -1)
        region_concept_ids = torch.randint(0, self.num_concepts, (b, n), generator=g)
        for i in range(b):  # one anchor per example: concept i on token 1 and region 0
            token_concept_ids[i, 1] = region_concept_ids[i, 0] = i % self.num_concepts
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            visual_feats=torch.randn(b, n, self.visual_feat_dim, generator=g),
            visual_pos=random_boxes(b, n, g),
            visual_attention_mask=visual_attention_mask,
            token_concept_ids=token_concept_ids,
            region_concept_ids=region_concept_ids,
        )
        return self.get_config(), inputs

    def prepare_config_and_inputs_for_common(self):
        return self.prepare_config_and_inputs()

    def labels_for(self, model_class, inputs: dict) -> dict:
        """The labels (and label-side inputs) of `model_class`, shaped for the inputs of `_prepare_for_class`."""
        b, t, n = self.batch_size, self.seq_length, self.num_regions
        if model_class is CMALForPreTraining:
            labels = torch.full((b, t), -100)
            labels[:, 3] = inputs["input_ids"][:, 3]  # one masked word per example
            masked_regions = torch.zeros(b, n, dtype=torch.bool)
            masked_regions[:, 2] = True
            return dict(labels=labels, itm_labels=torch.arange(b) % 2, masked_regions=masked_regions)
        if model_class is CMALForQuestionAnswering:
            scores = torch.zeros(b, self.num_labels)  # VQA soft scores in [0, 1]
            scores[torch.arange(b), torch.arange(b) % self.num_labels] = 1.0
            scores[0, -1] = 0.3
            return dict(labels=scores)
        if model_class in (CMALForImageTextClassification, CMALForVisualReasoning, CMALForImageTextRetrieval):
            # class 0, as transformers' own `_prepare_for_class` gives sequence classifiers: valid for any
            # `num_labels` the common tests set (test_problem_types goes down to 1)
            return dict(labels=torch.zeros(b, dtype=torch.long))
        if model_class is CMALForReferringExpression:
            return dict(labels=torch.arange(b) % (n - 1))  # a real region (the last one of example -1 is padding)
        return {}


# Region-side inputs of NLVR2 carry an extra image axis of size 2.
PAIRED_INPUTS = ("visual_feats", "visual_pos", "visual_attention_mask", "region_concept_ids", "region_scores")


class CMALModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (
        CMALModel,
        CMALForPreTraining,
        CMALForQuestionAnswering,
        CMALForImageTextClassification,
        CMALForVisualReasoning,
        CMALForReferringExpression,
        CMALForImageTextRetrieval,
    )

    # Inputs besides `input_ids` that tests building their own inputs (eager vs sdpa) must pass on.
    additional_model_inputs = [
        "visual_feats", "visual_pos", "visual_attention_mask", "token_concept_ids", "region_concept_ids"
    ]  # fmt: skip

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The models are tiny: intra-op threads only add synchronisation, which on a busy 2-core machine makes
        # each small matmul wait milliseconds for the other thread (measured: 100x slower than one thread).
        cls._num_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cls._table_patches = []
        for auto_class, table in AUTO_CLASS_TABLES.items():
            names = registered_names(auto_class)
            if names:
                value = {**getattr(test_modeling_common, table), "cmal": names if len(names) > 1 else names[0]}
                cls._table_patches.append(mock.patch.object(test_modeling_common, table, value))
        for patch in cls._table_patches:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in reversed(cls._table_patches):
            patch.stop()
        torch.set_num_threads(cls._num_threads)
        super().tearDownClass()

    def setUp(self):
        self.model_tester = CMALModelTester(self)
        self.config_tester = ConfigTester(self, config_class=CMALConfig, hidden_size=48, num_attention_heads=4)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = copy.deepcopy(inputs_dict)
        if return_labels:
            inputs.update(self.model_tester.labels_for(model_class, inputs))
        if model_class is CMALForVisualReasoning:  # the second image: the first one's regions reversed
            for key in PAIRED_INPUTS:
                if isinstance(inputs.get(key), torch.Tensor):
                    inputs[key] = torch.stack([inputs[key], inputs[key].flip(1)], dim=1)
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_load_with_mismatched_shapes(self):
        # transformers' test sets the shared config's vocab_size to 10 in its first subtest, so with more than one
        # sequence classifier (CMAL registers three) the later ones are saved with that vocabulary already and
        # cannot mismatch: run it once per class, each on a fresh config.
        for model_class in self.all_model_classes:
            with mock.patch.object(self, "all_model_classes", (model_class,)):
                super().test_load_with_mismatched_shapes()

    def test_reverse_loading_mapping(self):
        # CMAL's registered conversion (`CMALScalarToVector`) reshapes old 0-d hypersphere radii and renames nothing
        super().test_reverse_loading_mapping(check_keys_were_modified=False)
