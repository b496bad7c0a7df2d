"""Training: the shared loop, its flags, checkpoints, trajectories, weight views."""
