"""Classifier stage: a transfer-learning CNN that names each cell crop."""
