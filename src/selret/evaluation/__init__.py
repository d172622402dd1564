"""Benchmarks: ground-truth readers, metrics, baselines, evaluation runs, experiment grids and
plots. Imports features and encoding (not search: it ranks its benchmarks itself); only service,
distributed and cli may import it."""
