"""Downstream fine-tuning pieces: the speech-translation decoder and evaluation metrics."""
