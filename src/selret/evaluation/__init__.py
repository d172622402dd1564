"""Benchmarks: ground-truth readers, metrics, baselines, evaluation runs, experiment grids and
plots. May import features, encoding and search; nothing below imports it."""
