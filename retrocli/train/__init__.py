"""Training: the loop, its samples and curriculum, checkpoints, and the pretraining and SFT jobs."""
