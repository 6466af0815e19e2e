"""Evaluation of a model (`sftlab eval`, `evaluate.py`): task metrics and the few-shot baseline (`generalization`),
forgetting probes (`forgetting`), answer metrics and the paired bootstrap (`metrics`), NLL scoring (`scoring`)."""
