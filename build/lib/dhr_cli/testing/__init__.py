"""Generated data (procedural scenes, CAMs, features) and the per-image oracle of the method,
importable by the tests, the benchmarks and the demo."""
