"""CMAL training: Accelerate scripts for pre-training and fine-tuning, data, metrics and configs."""
