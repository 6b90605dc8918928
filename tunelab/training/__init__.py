"""Training machinery shared by every objective: setup, optimizer, loop, checkpoints, metrics."""
