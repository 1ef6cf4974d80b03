"""The online engine: `WSMOptimizer`, its merges, buffers, backends, readouts and state-dict format."""
