"""Evaluation after fit: `evaluate.evaluate` measures a trained model and draws its figures; each metric
family lives in its own module (likelihood, reconstruction, codes, downstream, disentanglement)."""
