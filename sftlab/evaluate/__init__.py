"""Evaluation: answer metrics (exact match, ROUGE-L) for generated outputs."""
