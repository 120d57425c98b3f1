"""Runnable examples (also imported by the benchmarks)."""
