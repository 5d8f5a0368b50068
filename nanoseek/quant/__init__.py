"""Quantisation applied from outside the model: the FP8 vocabulary (fp8.py), FP8 training
(training.py), FP8-resident inference (inference.py) and checkpoint conversion (convert.py)."""
