"""Training: the loop shared by both stages, its objectives, strategies (one process, DDP, FSDP), batches, run log,
resumable state and checkpoint writing. Models are built and loaded through ``phivlm.loading``."""
