"""The training loop's parts: one step, validation, schedule, state, RNG, batch-size finding, logging."""
