"""Stage 3, vectors -> ranked results: the vector index, the persistent image store, sharded
search, query expansion and the ``SearchEngine`` (an encoder plus its index)."""
