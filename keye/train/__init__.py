"""Stage runner, metrics, and (later) optimisers, schedules, freezing and checkpoints."""
