"""Training: the jitted steps and optimiser, the loop, checkpoints and restore, and the run directory it writes."""
