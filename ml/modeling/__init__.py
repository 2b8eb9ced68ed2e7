"""Modeling: training and selection, evaluation, the model registry, explanations and batch scoring."""
