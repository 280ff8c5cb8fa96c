"""What the commands do: train, sweep, study, compare, evaluate, sample, demo, and connecting to Ray."""
