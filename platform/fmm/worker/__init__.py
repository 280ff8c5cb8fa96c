"""The training loop of one worker, the sessions that run it (Ray Train, a Tune trial, or in-process) and
the training-state checkpoints it writes and restores."""
