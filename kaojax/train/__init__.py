"""KaoLRM training: optimiser, state, steps, checkpoints, loop."""
