"""Training: config, train state and steps, the loop, checkpoints, metrics."""
