"""Stage 3, vectors -> ranked results.

``vectors`` (``VectorIndex``: faiss exact / HNSW / IVF-PQ) on ``kernels`` (batch-independent brute
force); ``expansion`` (average query expansion); ``hits`` (``SearchHit``); ``store`` (``ImageIndex``,
the persistent index and its catalog); ``sharded`` (``ShardedSearch``); ``engine`` (``SearchEngine``:
an encoder plus its index).
"""
