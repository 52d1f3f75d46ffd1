"""The benchmark: ``votebox bench`` (docs/benchmarks.md)."""
