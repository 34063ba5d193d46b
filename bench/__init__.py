"""Benchmarks and their aids (not shipped in the image)."""
