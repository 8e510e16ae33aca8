"""Benchmarks: `./dev bench [name]`. Figures are medians, beside a baseline run alongside."""
