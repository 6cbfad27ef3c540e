"""Evaluations: encoders run over data and scored (zero-shot tasks, encoder-pair ranking)."""
