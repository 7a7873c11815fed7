"""Image-text retrieval Recall@K (both directions, COCO/Flickr30k protocol) as a local `evaluate` metric."""

import datasets
import evaluate
import numpy as np

from cmal.training.metrics.local_metric import local_metric

_DESCRIPTION = """\
Image-text retrieval recall. `predictions` is the similarity matrix given row by row: one row per text
(caption) query, each row the scores of that text against all N images (higher = more similar).
`references[t]` is the index of the ground-truth image of text t (several texts, usually 5, share an image).
Text->image R@K: share of texts whose ground-truth image is among the K highest-scoring images of its row.
Image->text R@K: share of images (those with at least one text) for which ANY of their texts is among the
K highest-scoring texts of the image's column. Ties are broken by lower index. All recalls are in percent
(0-100) as reported in papers; `rsum` is the sum of all of them.
"""

_CITATION = """\
@inproceedings{faghri2018vse,
  title={{VSE++}: Improving Visual-Semantic Embeddings with Hard Negatives},
  author={Faghri, Fartash and Fleet, David J. and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle={BMVC},
  year={2018}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `list` of `float`): score rows, one per text, each of length N (number of images).
    references (`list` of `int`): ground-truth image index of each text.
    ks (`tuple` of `int`, default (1, 5, 10)): the K values.
Returns:
    text_to_image_r{K}, image_to_text_r{K} (`float`, percent) for each K, and rsum (`float`).
Examples:
    >>> metric = evaluate.load("training/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1], ks=(1,))
    {'text_to_image_r1': 100.0, 'image_to_text_r1': 100.0, 'rsum': 200.0}
"""


def _ranks_desc(scores):
    """Position of each entry when sorted by descending score (ties: lower index first)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[-1])[None, :].repeat(scores.shape[0], 0), axis=-1)
    return ranks


@local_metric(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, predictions=datasets.Sequence(datasets.Value("float32")), references=datasets.Value("int64"))
class RetrievalRecall(evaluate.Metric):
    def _compute(self, predictions, references, ks=(1, 5, 10)):
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError("predictions must be rows of equal length (one score per image)")
        n_texts, n_images = scores.shape
        gt = np.asarray(references, dtype=np.int64)
        if gt.shape != (n_texts,):
            raise ValueError("need exactly one reference image index per text row")
        if n_texts and (gt.min() < 0 or gt.max() >= n_images):
            raise ValueError(f"reference image index outside [0, {n_images})")

        # text -> image: rank of the ground-truth image in each row.
        t2i_rank = _ranks_desc(scores)[np.arange(n_texts), gt]
        # image -> text: best rank among the image's own texts in its column.
        col_ranks = _ranks_desc(scores.T)  # (n_images, n_texts)
        i2t_rank = []
        for j in range(n_images):
            own = np.nonzero(gt == j)[0]
            if own.size:
                i2t_rank.append(col_ranks[j, own].min())
        i2t_rank = np.asarray(i2t_rank)

        result = {}
        for k in ks:
            result[f"text_to_image_r{k}"] = float(100.0 * np.mean(t2i_rank < k)) if n_texts else 0.0
        for k in ks:
            result[f"image_to_text_r{k}"] = float(100.0 * np.mean(i2t_rank < k)) if i2t_rank.size else 0.0
        result["rsum"] = float(sum(result.values()))
        return result
