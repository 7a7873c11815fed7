"""The Inference Endpoint handler (`handler.py`, `requirements.txt`), shipped inside the package so that
`finetune.py` can put it at the root of a VQA checkpoint from a wheel install too."""
