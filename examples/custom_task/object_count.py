"""A sixth task registered from outside the package: "how many objects are there?" on the synthetic world,
answered by the VQA head. This file and its card template `object_count.md` are all it takes:

    import object_count  # registers the task
    from cmal.training import finetune
    finetune.main(["--task", "object_count", "--output_dir", "outputs/cmal-object-count"])

The world writes no table for it: `synthetic_data` derives one from the world's scenes, splitting by the
images of each split of the world's captions (so a family stays in one split, as the world's own tables do).
"""

import os

from cmal.training.tasks import Metric, VisualQuestionAnswering, register_task

QUESTIONS = ("how many objects are there?", "how many things are in the picture?")


class ObjectCount(VisualQuestionAnswering):
    def synthetic_data(self, world):
        import datasets

        from cmal.training.data.synthetic import VQA_ANNOTATORS, world_scenes

        scenes = dict(zip(world["regions"]["image_id"], world_scenes(world)))
        splits = {}
        for split, captions in world["captions"].items():
            rows = [{"image_id": image_id, "question": question, "answers": [str(len(scenes[image_id].objects))] * VQA_ANNOTATORS}
                    for image_id in dict.fromkeys(captions["image_id"]) for question in QUESTIONS]  # fmt: skip
            features = datasets.Features({"image_id": datasets.Value("string"), "question": datasets.Value("string"),
                                          "answers": datasets.List(datasets.Value("string"))})  # fmt: skip
            splits[split] = datasets.Dataset.from_list(rows, features=features)
        return datasets.DatasetDict(splits)


TASK = register_task(ObjectCount(
    name="object_count", head_name="CMALForQuestionAnswering", reader_name="read_vqa_v2", reader_args=("annotations",),
    text_column="question", target_column="answers", metric="vqa_accuracy", main_metric="vqa_accuracy",
    pipeline_task="visual-question-answering", synthetic_table="object_count", card_title="Object Counting",
    card_metrics=(Metric("vqa_accuracy", "accuracy", "Counting accuracy"),),
    card_template=os.path.join(os.path.dirname(os.path.abspath(__file__)), "object_count.md"),
))  # fmt: skip
