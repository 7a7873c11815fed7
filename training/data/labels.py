"""The class names of the real formats' labels, in the order the canonical tables number them: shared by the
readers (`downstream.py`), the synthetic world and the task registry, which must import them without torch."""

VE_LABELS = ["entailment", "neutral", "contradiction"]
NLVR2_LABELS = ["false", "true"]
