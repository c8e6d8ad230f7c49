"""Canopy's benchmarks: a WebSocket load generator with its own stack, the target matrix, and
micro-benchmarks of single hops. Entry point: `python -m bench` (`make bench`); see
docs/performance.md."""
