"""Training: LM tuning modes, checkpoints, the training loop shared by both stages."""
