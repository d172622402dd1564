"""Stage 3, vectors -> ranked results.

``vectors`` (``VectorIndex``: exact / HNSW / IVF-PQ / IVF fast-scan + exact re-ranking (``ivf``) / binary codes + exact re-ranking (``binary``)) on ``kernels`` (batch-independent brute
force); ``expansion`` (average query expansion); ``hits`` (``SearchHit``); ``store`` (``ImageIndex``,
the persistent index and its catalog); ``sharded`` (``ShardedSearch``); ``engine`` (``SearchEngine``:
an encoder plus its index).
"""
