"""Evaluation of saved runs: a checkpoint scored on a split or file, and per-token explanations of its predictions."""
