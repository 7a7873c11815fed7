"""training/pretrain.py and its data pipeline, on a small hand-made corpus and a tiny model."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, communicate_or_kill, die_after_saving, run_without_project
from conftest import SHAPE_NAMES as NAMES
from conftest import pretrain_args as args_for
from datasets import DatasetDict, load_from_disk
from safetensors.torch import load_file

from cmal.training import pretrain, pretrain_run
from cmal.training.data.pretraining import ImageTextPairs, LengthGroupedSampler, MatchingPairs, PretrainingCollator
from cmal.training.data.region_store import load_region_store


@pytest.fixture
def corpus(pretraining_corpus):
    return pretraining_corpus


def test_collator_targets(corpus):
    captions, regions = DatasetDict.load_from_disk(str(corpus / "captions"))["train"], load_region_store(str(corpus / "regions"))[0]
    args = pretrain.parse_args(args_for(corpus, corpus / "unused"))
    tokenizer = pretrain_run.build_tokenizer(args, captions["text"])
    config = pretrain_run.build_config(args, tokenizer, {"feature_dim": 16, "concept_names": NAMES})
    assert (config.vocab_size, config.visual_feat_dim, config.concept_names) == (len(tokenizer), 16, NAMES)
    from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor

    processor = CMALProcessor(CMALImageProcessor(concept_names=NAMES), tokenizer, AnchorLexicon(NAMES).to_dict())
    pairs = ImageTextPairs(captions, regions)
    collator = PretrainingCollator(processor, pairs, mlm_probability=0.3, mrm_probability=0.3, seed=1)
    items = [pairs[i] for i in range(16)]
    batch = collator(items)
    again = collator(items[::-1])  # another batch order: the same targets per example
    for key in ("labels", "masked_regions", "itm_labels"):
        assert torch.equal(again[key].flip(0)[:, : batch[key].shape[1]] if batch[key].dim() > 1 else again[key].flip(0), batch[key]), key
    pairs.set_epoch(1)  # the items carry their epoch (`TrainingData`): the collator keeps none of its own
    assert [pairs[i]["epoch"] for i in range(16)] == [1] * 16
    assert not torch.equal(collator([pairs[i] for i in range(16)])["labels"], batch["labels"])  # new epoch, new masks
    assert torch.equal(collator(items)["labels"], batch["labels"])  # an item of epoch 0 is masked as in epoch 0
    pairs.set_epoch(0)

    mlm, mrm, matched = (batch["labels"] != -100).any(1), batch["masked_regions"].any(1), batch["itm_labels"] == 1
    assert not (mlm & mrm).any()  # one modality at a time
    masked_words = (batch["input_ids"] == tokenizer.mask_token_id).any(1)
    assert not (~matched & (mlm | mrm | masked_words)).any()  # mismatched pairs serve ITM only (a clean pass): unmasked
    assert (matched <= (mlm | mrm)).all() and 0 < matched.sum() < 16
    masked_tokens = batch["labels"] != -100
    assert (batch["token_concept_ids"][masked_tokens] == -1).all()  # anchors are never MLM targets
    assert (batch["masked_regions"] <= batch["visual_attention_mask"].bool()).all()
    keys = {"input_ids", "attention_mask", "token_type_ids", "token_concept_ids", "visual_feats", "visual_pos",
            "visual_attention_mask", "region_concept_ids", "region_scores", "labels", "masked_regions", "itm_labels"}  # fmt: skip
    assert set(batch) == keys

    # A negative image of which the caption is also true is drawn again: here every even row "fits" every caption.
    drawn = []
    fussy = PretrainingCollator(processor, pairs, seed=1, true_of=lambda text, row: row % 2 == 0)
    fussy.dataset = SimpleNamespace(num_images=pairs.num_images, regions_of_images=lambda rows: drawn.extend(rows) or pairs.regions_of_images(rows))
    labels = fussy(items)["itm_labels"]
    negatives = [row for row, label in zip(drawn, labels) if label == 0]
    assert negatives and all(row % 2 == 1 for row in negatives)


@pytest.mark.parametrize("window", [1, 4, 0])
def test_itm_negatives_come_from_the_images_nearest_in_region_count(corpus, window):
    """`--itm_negative_window W`: another image among the W nearest in region count (the window shifted inwards
    at either end of the order), so a length-grouped batch keeps its length; each of them is drawn. 0: any."""
    args = pretrain.parse_args(args_for(corpus, corpus / "unused"))
    _, processor, pairs, _, _ = pretrain_run.build_data(args, pretrain_run.load_corpus(args))
    order = np.argsort(pairs.num_regions(), kind="stable")
    collator = PretrainingCollator(processor, pairs, negative_window=window)
    rng = np.random.default_rng(0)
    for row in range(pairs.num_images):
        place = int(np.flatnonzero(order == row)[0])
        start = min(max(place - (window + 1) // 2, 0), pairs.num_images - window - 1)
        expected = set(order[start : start + window + 1].tolist()) if window else set(range(pairs.num_images))
        assert {collator.matching.negative_image(row, rng) for _ in range(300)} == expected - {row}, row


@pytest.mark.parametrize("twin_probability", [1.0, 0.5, 0.0])
def test_itm_negatives_are_contrast_twins_of_which_the_caption_is_false(corpus, twin_probability):
    """Where the corpus has contrast twins (the synthetic world), a negative is one with `twin_probability`, unless
    the caption is true of every twin; else another image. Pairs are a function of (seed, epoch, index)."""
    captions, regions = DatasetDict.load_from_disk(str(corpus / "captions"))["train"], load_region_store(str(corpus / "regions"))[0]
    pairs = ImageTextPairs(captions, regions)
    n = pairs.num_images
    twins = lambda row: [row ^ 1] if row ^ 1 < n else []  # noqa: E731  (images 2k and 2k+1 are twins)
    true_of = lambda text, row: row % 4 == 3  # noqa: E731  (the caption holds of every fourth image)
    matching = MatchingPairs(pairs.num_regions(), 1.0, true_of, twins=twins, twin_probability=twin_probability)
    rows, labels = matching.pairs(pairs, seed=3)
    own = pairs.image_rows
    assert (labels == 0).all() and (rows != own).all() and not any(true_of("", row) for row in rows)
    is_twin = rows == own ^ 1
    usable = np.array([bool(twins(row)) and not true_of("", twins(row)[0]) for row in own])
    if twin_probability == 1.0:
        assert (is_twin == usable).all()
    elif twin_probability == 0.0:
        assert is_twin.mean() < 0.2  # a random other image is the twin only by chance
    else:
        assert 0.3 < is_twin[usable].mean() < 0.7
    again = matching.pairs(pairs, seed=3)
    assert (again[0] == rows).all() and not (matching.pairs(pairs, seed=4)[0] == rows).all()


def test_sampler_is_seeded_per_epoch_and_groups_lengths():
    lengths = list(np.random.default_rng(0).integers(1, 50, 500))
    sampler = LengthGroupedSampler(lengths, batch_size=2, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(500)) and first == list(sampler)
    assert all(lengths[a] >= lengths[b] for a, b in zip(first[:20], first[1:20]))  # sorted within a group
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.mark.parametrize("count, batch_size", [(1, 4), (7, 4), (100, 3), (1000, 8), (12345, 32)])
def test_length_grouped_order_is_transformers_order(count, batch_size):
    """The numpy order is transformers' `get_length_grouped_indices` order, ties and the longest-first swap included."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from cmal.training.data.pretraining import length_grouped_indices

    lengths = np.random.default_rng(count).integers(5, 40, count)
    expected = get_length_grouped_indices(lengths.tolist(), batch_size, generator=torch.Generator().manual_seed(3))
    assert length_grouped_indices(lengths, batch_size, torch.Generator().manual_seed(3)).tolist() == expected


def stream_loaders(corpus, processes: int, workers: int, shards: int):
    """Each process's stream of item indices, as `pretrain_run.build_data` makes it (the collator swapped for one
    that keeps the indices), with `workers` DataLoader workers."""
    from torch.utils.data import DataLoader

    argv = args_for(corpus, corpus / "unused", "--streaming", "--curriculum_epochs", "0", "--num_workers", str(workers),
                    "--streaming_shards", str(shards), "--per_device_train_batch_size", "3")  # fmt: skip
    args, data = pretrain.parse_args(argv), pretrain_run.load_corpus(pretrain.parse_args(argv))
    loaders = []
    for rank in range(processes):
        stream = pretrain_run.build_data(args, data, processes, rank)[4].dataset
        loaders.append(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda items: [i["index"] for i in items]))
    return loaders


def test_streaming_reads_every_example_once_per_epoch_over_processes_and_workers(corpus):
    """2 processes x 2 workers: every example once per epoch, each reader (process, worker) on its own shards,
    a new order each epoch, and as many batches as the loader says (the schedule is sized from it)."""
    loaders = stream_loaders(corpus, processes=2, workers=2, shards=8)
    total = len(loaders[0].dataset.pairs)
    orders = []
    for epoch in (0, 1):
        seen = []
        for loader in loaders:
            loader.dataset.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) and all(1 <= len(batch) <= 3 for batch in batches)
            seen.append([index for batch in batches for index in batch])
        assert sorted(seen[0] + seen[1]) == list(range(total))  # once each, across both processes
        orders.append(seen)
    assert not set(orders[0][0]) & set(orders[0][1]) and set(orders[0][0]) == set(orders[1][0])  # own shards
    assert orders[0][0] != orders[1][0]  # reshuffled
    with pytest.raises(ValueError, match=r"--streaming_shards 3 is fewer than the 4 readers \(2 processes x 2 workers\)"):
        stream_loaders(corpus, processes=2, workers=2, shards=3)
    with pytest.raises(SystemExit):
        pretrain.parse_args(args_for(corpus, corpus / "unused", "--streaming"))  # the curriculum needs random access


def test_streaming_resume_skips_to_exactly_where_the_run_was(corpus):
    """What a resumed run reads (accelerate's `skip_first_batches`, as the training loop does) is the rest of
    the epoch the killed run was reading, with 2 workers."""
    from accelerate.data_loader import skip_first_batches

    (loader,) = stream_loaders(corpus, processes=1, workers=2, shards=8)
    loader.dataset.set_epoch(3)
    whole = list(loader)
    assert list(skip_first_batches(loader, 5)) == whole[5:] and len(whole) > 6


@pytest.mark.parametrize("texts", [[], ["--pretokenize"]], ids=["texts", "pretokenized"])
def test_streamed_pretraining_killed_and_resumed_ends_with_the_same_weights(corpus, tmp_path, monkeypatch, texts):
    """Streamed pre-training with a DataLoader worker, interrupted after its step-4 checkpoint (mid-epoch: 5 batches
    per epoch) and resumed from it: the weights of the uninterrupted run, its captions tokenized per batch or once."""
    def run(folder, *extra):
        return pretrain.main(args_for(corpus, folder, "--streaming", "--curriculum_epochs", "0", "--streaming_shards", "4",
                                      "--num_workers", "1", "--per_device_train_batch_size", "16", "--max_train_steps", "7",
                                      "--checkpointing_steps", "2", *texts, *extra))  # fmt: skip

    whole = run(tmp_path / "whole")
    undo = die_after_saving(monkeypatch, 4)
    with pytest.raises(SystemExit, match="130"):
        run(tmp_path / "killed")
    undo()
    resumed = run(tmp_path / "killed", "--resume_from_checkpoint", "latest")
    assert whole["steps"] == resumed["steps"] == 7
    expected, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(again[name], expected[name], msg=name)


def test_captions_encoded_once_train_to_the_same_weights_and_are_cached(corpus, tmp_path, monkeypatch):
    """`--pretokenize`: the captions are encoded once, beside their files, and a second run loads them (the
    processor is not asked again); both runs end in the weights of a run that tokenizes every batch."""
    from cmal.processors import CMALProcessor

    def run(folder, *extra):
        return pretrain.main(args_for(corpus, folder, "--num_workers", "1", "--max_train_steps", "6", *extra))

    run(tmp_path / "texts")
    run(tmp_path / "once", "--pretokenize")
    assert glob.glob(str(corpus / "captions" / "**" / "cache-*.arrow"), recursive=True)  # beside the captions' files
    monkeypatch.setattr(CMALProcessor, "encode_texts", lambda self, *a, **k: pytest.fail("encoded again"))
    run(tmp_path / "again", "--pretokenize")
    expected = load_file(tmp_path / "texts" / "model.safetensors")
    for run_name in ("once", "again"):
        weights = load_file(tmp_path / run_name / "model.safetensors")
        assert all(torch.equal(weights[name], expected[name]) for name in expected), run_name


def test_curriculum_epochs_draw_small_scenes_only():
    lengths = list(range(100))
    easy = list(range(0, 100, 4))
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, easy=easy, easy_epochs=2)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == 100 and set(drawn) <= set(easy) and len(set(drawn)) > 15  # as long, from the easy ones
    sampler.set_epoch(2)
    assert sorted(sampler) == lengths
    assert sorted(LengthGroupedSampler(lengths, 4, easy=[], easy_epochs=2)) == lengths  # nothing easy: no curriculum


def test_a_batch_of_items_is_read_in_one_call_as_row_by_row(corpus):
    captions = load_from_disk(str(corpus / "captions"))["train"]
    pairs = ImageTextPairs(captions, load_region_store(str(corpus / "regions"))[0])
    indices = [7, 0, 7, len(pairs) - 1]
    expected = [{"index": i, "epoch": 0, "text": captions[i]["text"], "image_row": int(pairs.image_rows[i])} for i in indices]
    assert pairs.__getitems__(np.array(indices)) == expected and [pairs[i] for i in indices] == expected


def test_easy_pairs_are_the_small_scenes(corpus):
    pairs = ImageTextPairs(load_from_disk(str(corpus / "captions"))["train"], load_region_store(str(corpus / "regions"))[0])
    counts = pairs.num_regions()[pairs.image_rows]
    easy = pairs.easy_pairs()
    assert 0 < len(easy) < len(pairs) and counts[easy].max() <= np.median(counts) < counts.max()
    assert pairs.easy_pairs(quantile=1.0).tolist() == list(range(len(pairs)))


# ITM is not here: matching must be learnt across modalities from scratch, which takes far more than 24
# images and 90 steps (its loss stays at ln 2 here). That ITM trains is checked on a fixed batch in
# test_modeling_cmal.py; that it sees clean inputs, in test_pretraining_objectives.py.
@pytest.mark.parametrize("objective", ["mlm", "mrm", "amc", "itc"])
def test_each_objective_alone_learns(corpus, tmp_path, objective):
    weights = {name: "0" for name in ("mlm", "mrm", "itm", "amc", "itc")}
    weights[objective] = "1"
    flags = [item for name, value in weights.items() for item in (f"--{name}", value)]
    results = pretrain.main(args_for(corpus, tmp_path, *flags, "--max_train_steps", "90", "--learning_rate", "3e-3",
                                     "--logging_steps", "15", "--per_device_train_batch_size", "16"))  # fmt: skip
    first, last = results["first_losses"], results["final_losses"]  # means over the first and last 15 steps
    parts = [name for name in last if name.startswith(objective)]
    assert parts and set(last) == set(parts) | {"loss"}, last
    assert last["loss"] < 0.9 * first["loss"], (first, last)


def test_ablation_flags_reach_the_config(corpus):
    args = pretrain.parse_args(args_for(corpus, "unused", "--amc_parts", "region", "pointer", "--no_hypersphere",
                                        "--anchor_fill", "mask", "--anchor_mask_prob", "0.5", "--amc", "2"))  # fmt: skip
    config = pretrain_run.build_config(args, *_tokenizer_and_metadata(corpus, args))
    assert (config.amc_token_weight, config.amc_region_weight, config.amc_pointer_weight) == (0.0, 2.0, 2.0)
    assert (config.hypersphere, config.anchor_fill, config.anchor_mask_prob) == (False, "mask", 0.5)
    default = pretrain_run.build_config(pretrain.parse_args(args_for(corpus, "unused")), *_tokenizer_and_metadata(corpus, args))
    assert (default.amc_token_weight, default.hypersphere, default.anchor_fill, default.anchor_mask_prob) == (1.0, True, "swap", 0.3)


@pytest.mark.parametrize("flags, padding_free", [([], False), (["--padding_free"], True)])
def test_padding_free_flag_reaches_the_model(corpus, flags, padding_free):
    args = pretrain.parse_args(args_for(corpus, "unused", *flags))
    model = pretrain_run.build_model(args, pretrain_run.build_config(args, *_tokenizer_and_metadata(corpus, args)))
    assert model.config.padding_free is padding_free


def _tokenizer_and_metadata(corpus, args):
    corpus = pretrain_run.load_corpus(args)
    return pretrain_run.build_tokenizer(args, corpus.vocabulary_texts), corpus.metadata


@pytest.mark.parametrize("fraction, images", [(1.0, 24), (0.5, 12), (0.25, 6), (0.01, 1)])
def test_corpus_fraction_keeps_whole_images(corpus, fraction, images):
    captions, *_ = pretrain_run.load_corpus(pretrain.parse_args(args_for(corpus, "unused")))
    subset = pretrain_run.corpus_subset(captions["train"], fraction)
    assert len(set(subset["image_id"])) == images and len(subset) == 2 * images  # both captions of each kept image
    assert subset["image_id"][: 2 * images] == captions["train"]["image_id"][: 2 * images]


def test_corpus_fraction_out_of_range_is_refused(corpus):
    captions, *_ = pretrain_run.load_corpus(pretrain.parse_args(args_for(corpus, "unused")))
    with pytest.raises(ValueError, match=r"--corpus_fraction must lie in \(0, 1\], got 0"):
        pretrain_run.corpus_subset(captions["train"], 0)


def test_run_leaves_a_hub_ready_folder(corpus, tmp_path):
    results = pretrain.main(args_for(corpus, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3"))
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_cmal.py", "configuration_cmal.py", "processing_cmal.py",
            "image_processing_cmal.py", "anchor_lexicon.py", "processor_config.json", "tokenizer.json",
            "README.md", "train_results.json", "checkpoints"} <= files  # fmt: skip
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_3", "step_6"]
    assert results["steps"] == 6 and results["global_batch_size"] == 8
    assert "custom_code" in (tmp_path / "README.md").read_text()
    (tmp_path / "load").mkdir()
    report = run_without_project(LOAD, tmp_path, tmp_path / "load")
    assert report["class"].endswith("modeling_cmal.CMALForPreTraining") and report["finite"]
    assert report["token_concept_ids"][2] == NAMES.index("dog")


LOAD = """
import json, sys
import numpy as np
from transformers import AutoModelForPreTraining, AutoProcessor

folder = sys.argv[1]
model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
regions = {"features": np.ones((2, 16)), "boxes": [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], "boxes_normalized": True, "tags": ["dog", "cat"]}
inputs = processor(text="a dog and a cat", regions=regions)
out = model(**inputs)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "finite": bool(out.prediction_logits.isfinite().all()),
                  "token_concept_ids": inputs["token_concept_ids"][0].tolist()}))
"""


class NanGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss that would poison the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def edit_forward(monkeypatch, edit):
    """Pass the output of `CMALForPreTraining`'s n-th forward (n from 1) through `edit(output, n)`: a loss made NaN
    or driven up on cue, as a diverging run's is."""
    from cmal.modeling_cmal import CMALForPreTraining

    forward, calls = CMALForPreTraining.forward, [0]

    def edited(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls[0] += 1
        edit(out, calls[0])
        return out

    monkeypatch.setattr(CMALForPreTraining, "forward", edited)


@pytest.mark.parametrize("what, poison", [("loss", lambda loss: loss * float("nan")), ("gradient norm", NanGradient.apply)])
def test_non_finite_step_stops_before_the_update_and_resumes_with_a_new_learning_rate(corpus, tmp_path, monkeypatch, what, poison):
    edit_forward(monkeypatch, lambda out, n: setattr(out, "loss", poison(out.loss)) if n == 5 else None)
    argv = args_for(corpus, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--lr_scheduler_type", "constant")
    with pytest.raises(RuntimeError, match=rf"The {what} became nan at step 4; stopping before the update. The last good "
                                           r"checkpoint is .*step_4: resume from it with a lower --learning_rate"):  # fmt: skip
        pretrain.main(argv)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2", "step_4"]
    weights = load_file(tmp_path / "checkpoints" / "step_4" / "model.safetensors")
    assert all(bool(w.isfinite().all()) for w in weights.values())

    monkeypatch.undo()
    results = pretrain.main(argv + ["--resume_from_checkpoint", "latest", "--learning_rate", "2.5e-4"])
    assert results["steps"] == 6 and all(np.isfinite(v) for v in results["final_losses"].values())
    assert results["last_learning_rate"] == pytest.approx(2.5e-4)  # the checkpoint's 1e-3 is not silently kept


def test_the_nan_guard_names_the_checkpoint_saved_before_the_loss_rose_and_it_trains(corpus, tmp_path, monkeypatch):
    """The loss rises a hundredfold from step 5 (as a diverging run's does) and is NaN at step 9: step_8 and step_6
    hold finite weights saved at a risen loss, so the guard names step_4, which resumed at a lower rate trains on."""
    from cmal.training import pretrain_run

    def diverging(out, n):
        out.loss = out.loss * (float("nan") if n == 9 else 100.0 if n >= 5 else 1.0)
        for name in pretrain_run.LOSSES:  # the logged losses rise with it
            if out.get(name) is not None and 5 <= n < 9:
                out[name] = out[name] * 100.0

    edit_forward(monkeypatch, diverging)
    argv = args_for(corpus, tmp_path, "--max_train_steps", "10", "--checkpointing_steps", "2", "--lr_scheduler_type", "constant")
    with pytest.raises(RuntimeError, match=r"The loss became nan at step 8; .* The last good checkpoint is .*step_4 \(the newest, "
                                           r".*step_8, was saved when the loss had already risen\)"):  # fmt: skip
        pretrain.main(argv)
    risen = json.loads((tmp_path / "checkpoints" / "step_8" / "training_loss.json").read_text())["loss"]
    monkeypatch.undo()
    results = pretrain.main([*argv, "--resume_from_checkpoint", str(tmp_path / "checkpoints" / "step_4"), "--overwrite_output_dir",
                             "--learning_rate", "2.5e-4"])  # fmt: skip
    assert results["steps"] == 10 and all(np.isfinite(v) for v in results["final_losses"].values())
    assert sum(results["final_losses"].values()) < risen / 10


@pytest.mark.parametrize("checkpointing, why", [([], "was not set"), (["--checkpointing_steps", "5"], "5 comes after step 2")])
def test_a_divergence_before_any_checkpoint_says_none_exists_and_how_to_have_one(corpus, tmp_path, monkeypatch, checkpointing, why):
    edit_forward(monkeypatch, lambda out, n: setattr(out, "loss", out.loss * float("nan")) if n == 3 else None)
    with pytest.raises(RuntimeError, match=rf"The loss became nan at step 2; stopping before the update. No checkpoint exists to "
                                           rf"resume from \(--checkpointing_steps {why}\): start over with a lower --learning_rate, "
                                           r".* and --checkpointing_steps N"):  # fmt: skip
        pretrain.main(args_for(corpus, tmp_path, "--max_train_steps", "6", *checkpointing))


def test_killed_run_resumes_to_the_same_weights(corpus, tmp_path):
    """SIGKILL mid-run (possibly mid-save), resume from `latest`: the same weights as an uninterrupted run."""
    common = args_for(corpus, "OUT", "--max_train_steps", "30", "--checkpointing_steps", "2", "--checkpoints_total_limit", "100")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def command(output_dir, *extra):
        return [sys.executable, "training/pretrain.py", *[str(output_dir) if a == "OUT" else a for a in common], *extra]

    reference = tmp_path / "reference"
    subprocess.run(command(reference), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step_6").exists():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = sorted(int(n.split("_")[1].split(".")[0]) for n in os.listdir(killed / "checkpoints") if not n.endswith(".tmp"))
    assert 6 <= steps[-1] < 30, steps  # killed mid-run
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run(command(killed, "--resume_from_checkpoint", "latest"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# 80 steps: at 40 the gain over the untrained loss is within the spread over seeds (ratio 0.92-0.98, measured)
DDP_STEPS = ["--max_train_steps", "80", "--learning_rate", "1e-3", "--logging_steps", "80"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def single_process_run(pretraining_corpus, tmp_path_factory):
    """One process with 8 examples per step: what the 2-process launches below must match."""
    folder = tmp_path_factory.mktemp("single") / "run"
    return folder, pretrain.main(args_for(pretraining_corpus, folder, *DDP_STEPS, "--per_device_train_batch_size", "8"))


@pytest.mark.parametrize("launch", ["cpu_2proc.yaml", "two machines"])
def test_two_processes_match_one_process(corpus, single_process_run, tmp_path, launch):
    """The shipped `training/configs/cpu_2proc.yaml` (2 gloo processes, the script choosing the CPU itself), and
    2 machines x 1 process on 127.0.0.1 (`--num_machines 2 --machine_rank 0/1`, as on a cluster), with 4 examples
    per process vs one process with 8: each step sees the same examples with the same masks (sampler and
    collator are seeded per example); only the loss averaging and the anchor draws differ."""
    from cmal.modeling_cmal import CMALForPreTraining
    from cmal.processors import CMALProcessor

    script = ["training/pretrain.py", *args_for(corpus, tmp_path / "ddp", *DDP_STEPS, "--per_device_train_batch_size", "4")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if launch == "cpu_2proc.yaml":
        commands = [ACCELERATE + ["--config_file", "training/configs/cpu_2proc.yaml", "--main_process_port", "29533", *script]]
    else:
        cluster = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                   "--main_process_port", "29534", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        commands = [ACCELERATE + cluster + ["--machine_rank", str(rank), *script] for rank in (0, 1)]
    machines = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True) for c in commands]  # fmt: skip
    stderr = [err for _, err in communicate_or_kill(machines, timeout=600)]  # a hung launch must not outlive the test
    assert all(machine.returncode == 0 for machine in machines), stderr[0][-3000:] + stderr[-1][-3000:]
    assert "x 2 processes" in stderr[0]
    ddp = json.loads((tmp_path / "ddp" / "train_results.json").read_text())
    single_folder, single = single_process_run
    assert ddp["global_batch_size"] == single["global_batch_size"] == 8 and ddp["steps"] == single["steps"] == 80

    # both models are equally good on the same batch, and both better than at the start
    captions = DatasetDict.load_from_disk(str(corpus / "captions"))["train"]
    regions = load_region_store(str(corpus / "regions"))[0]
    processor = CMALProcessor.from_pretrained(single_folder)
    pairs = ImageTextPairs(captions, regions)
    batch = PretrainingCollator(processor, pairs, seed=123)([pairs[i] for i in range(0, 48, 2)])

    def eval_loss(model):
        with torch.no_grad():
            return model.eval()(**batch).loss.item()

    losses = {name: eval_loss(CMALForPreTraining.from_pretrained(folder)) for name, folder in
              (("ddp", tmp_path / "ddp"), ("single", single_folder))}  # fmt: skip
    torch.manual_seed(0)
    untrained = eval_loss(CMALForPreTraining(CMALForPreTraining.config_class.from_pretrained(single_folder)))
    assert abs(losses["ddp"] - losses["single"]) < 0.02 * losses["single"], losses
    assert max(losses.values()) < 0.95 * untrained, (losses, untrained)


def test_two_processes_stream_with_two_workers_each(corpus, tmp_path):
    """`--streaming` under the shipped 2-process launch, 2 DataLoader workers per process: the stream is each
    process's own part (accelerate does not split it again) and the run trains its steps to the end; with
    `--pretokenize`, the first process encodes the captions (in 2 `datasets` processes) before the other reads them."""
    script = ["training/pretrain.py", *args_for(corpus, tmp_path / "run", "--streaming", "--curriculum_epochs", "0",
                                                "--num_workers", "2", "--streaming_shards", "8", "--max_train_steps", "6",
                                                "--pretokenize")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = ACCELERATE + ["--config_file", "training/configs/cpu_2proc.yaml", "--main_process_port", "29535", *script]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    stderr = communicate_or_kill([process], timeout=600)[0][1]
    assert process.returncode == 0, stderr[-3000:]
    assert "x 2 processes" in stderr
    # 48 captions in 8 shards of 6, 2 shards per reader (process x worker): 12 captions, batches of 8 and 4
    assert "48 examples, 4 steps/epoch" in stderr
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["steps"] == 6 and results["global_batch_size"] == 16


def test_push_to_hub_uploads_the_final_folder(corpus, tmp_path, monkeypatch):
    """No upload happens here: `HfApi` is replaced at its boundary and the calls it got are checked."""
    import huggingface_hub
    from test_push_to_hub import FakeApi

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    pretrain.main(args_for(corpus, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2",
                           "--push_to_hub", "--hub_model_id", "cmal-test"))  # fmt: skip
    assert FakeApi.calls[0] == ("create_repo", "cmal-test", None, True)
    name, repo, operations = FakeApi.calls[1]
    assert (name, repo) == ("create_commit", "me/cmal-test")  # the repo as the Hub names it, owner included
    # the uploaded card loads that repo (rendered again for it), not a bare name
    assert 'repo_id, revision = "me/cmal-test", "main"' in (tmp_path / "README.md").read_text()
    assert [path for path, _ in operations] == [
        "README.md", "anchor_lexicon.py", "config.json", "configuration_cmal.py", "image_processing_cmal.py",
        "legacy_cmal.py", "model.safetensors", "modeling_cmal.py", "processing_cmal.py", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "train_results.json", "validation_cmal.py",
    ]  # fmt: skip  (no checkpoints/, no logs)


def test_tensorboard_logs_every_loss(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    arguments = args_for(corpus, tmp_path, "--max_train_steps", "4", "--logging_steps", "2")
    arguments[arguments.index("--report_to") + 1] = "tensorboard"
    pretrain.main(arguments)
    runs = [root for root, _, files in os.walk(tmp_path) if any(f.startswith("events.out") for f in files)]
    (events,) = [e for e in (EventAccumulator(run).Reload() for run in runs) if e.Tags()["scalars"]]
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mlm_loss", "train/amc_pointer_loss", "train/lr"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_resume_from_a_wrong_path_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"`--resume_from_checkpoint` must be 'latest' or a checkpoint folder"):
        pretrain.main(args_for(corpus, tmp_path, "--max_train_steps", "2", "--resume_from_checkpoint", str(tmp_path / "nope")))


def test_validation_reports_held_out_itm(corpus, tmp_path):
    """With a validation split, the run reports ITM accuracy and AUC on held-out pairs, half of them mismatched."""
    captions = DatasetDict.load_from_disk(str(corpus / "captions"))["train"]
    held_out_images = {f"img{i}" for i in range(20, 24)}
    dataset = tmp_path / "dataset"
    DatasetDict(
        train=captions.filter(lambda row: row["image_id"] not in held_out_images),
        validation=captions.filter(lambda row: row["image_id"] in held_out_images),
    ).save_to_disk(str(dataset / "captions"))
    os.symlink(corpus / "regions", dataset / "regions")
    args = args_for(corpus, tmp_path / "out", "--max_train_steps", "2", "--itc", "1")
    args[args.index("--dataset") + 1] = str(dataset)
    held_out = pretrain.main(args)["validation"]
    assert held_out["itm_pairs"] == 8  # the 8 captions of the 4 held-out images
    assert 0 <= held_out["itm_accuracy"] <= 1 and 0 <= held_out["itm_auc"] <= 1
    assert set(held_out["losses"]) >= {"itm_loss", "itc_loss", "mlm_loss", "loss"}
    assert held_out["itc_images"] == 4 and 0 <= held_out["itc_text_to_image_r1"] <= held_out["itc_text_to_image_r5"] == 100
    saved = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert saved["validation"] == held_out
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"ROC AUC {held_out['itm_auc']:.4f} over 8 pairs" in card and "over 4 images (chance R@1: 25.0%)" in card


def test_a_run_with_a_detector_reads_its_detections_and_answers_from_pixels_alike(synthetic_detector, tmp_path, capsys):
    """`--detector` on the world: the regions trained on are the detector's over the world's images, and the saved
    model, fed a world image, matches what it does on that image's stored regions."""
    import PIL.Image

    from cmal.modeling_cmal import CMALForPreTraining
    from cmal.processors import CMALProcessor
    from cmal.training.data import synthetic
    from cmal.training.data.region_store import row_to_regions

    world = ["--synthetic_images", "60"]
    results = pretrain.main([*world, "--detector", str(synthetic_detector), "--model_config", "tiny", "--output_dir",
                             str(tmp_path / "run"), "--max_train_steps", "3", "--per_device_train_batch_size", "8",
                             "--report_to", "none", "--curriculum_epochs", "0"])  # fmt: skip
    assert results["steps"] == 3
    # 3 steps tell no pair apart: the run says so, against what rules reach
    assert (f"warning: held-out ITM AUC {results['validation']['itm_auc']:.3f} is below the 0.67 that rules on region "
            "count, tags and colour reach on these pairs") in capsys.readouterr().out
    corpus = pretrain_run.load_corpus(pretrain.parse_args([*world, "--detector", str(synthetic_detector)]))
    assert corpus.metadata["source"] == "detector" and corpus.metadata["feature_dim"] == 64
    assert corpus.regions["image_id"] == [f"synthetic-{i:06d}" for i in range(60)]

    model = CMALForPreTraining.from_pretrained(tmp_path / "run").eval()
    processor = CMALProcessor.from_pretrained(tmp_path / "run")
    assert model.config.detector_num_regions == 10 and model.config.detector_score_threshold == 0.3
    images = [PIL.Image.open(os.path.join(synthetic.default_world(num_images=60, seed=0), "images", f"synthetic-{i:06d}.png"))
              for i in (3, 4)]  # fmt: skip
    texts = ["a red ball", "two cubes"]
    from_pixels = model(**processor(text=texts, images=images, return_tensors="pt"))
    rows = [row_to_regions(corpus.regions.with_format("numpy")[i]) for i in (3, 4)]
    from_store = model(**processor(text=texts, regions=rows, return_tensors="pt"))
    torch.testing.assert_close(from_pixels.itm_logits, from_store.itm_logits, atol=2e-3, rtol=2e-3)  # float16 store


def test_a_detector_that_did_not_make_the_store_is_refused(corpus, synthetic_detector):
    args = pretrain.parse_args(args_for(corpus, corpus / "unused", "--detector", str(synthetic_detector)))
    with pytest.raises(ValueError, match=r"gives 64-d regions of .* but the region store has 16-d ones"):
        pretrain_run.build_config(args, *_tokenizer_and_metadata(corpus, args))
