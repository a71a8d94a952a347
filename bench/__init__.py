"""Benchmarks: each `bench/bench_<name>.py` defines `main(argv) -> int` and writes bench/results/."""
