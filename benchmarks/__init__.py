"""snapdisk's benchmark suite: `scripts/bench` (python -m benchmarks.run); see benchmarks/run.py."""
