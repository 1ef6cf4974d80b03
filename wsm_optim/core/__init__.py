"""The online engine: `WSMOptimizer`, its merges, accumulators, backends, readouts and state-dict format."""
