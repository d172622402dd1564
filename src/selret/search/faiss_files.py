"""Reading the faiss files of :class:`~selret.search.vectors.VectorIndex` (kinds ``"exact"``,
``"hnsw"``, ``"ivfpq"``): which kind a file holds, its ids and the settings stored with it."""

from __future__ import annotations

import os
from typing import Any

import faiss
import numpy as np

from selret.search.ivf import ivf_ids

__all__ = ["read_faiss"]


def read_faiss(path: str | os.PathLike) -> tuple[Any, str, np.ndarray, dict[str, Any]]:
    """(faiss index, kind, live ids, settings stored in the file) of a saved faiss index."""
    index = faiss.read_index(os.fspath(path))
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path}: not an inner-product index")
    if isinstance(index, faiss.IndexIVFPQ):
        found = "ivfpq"
        ids = ivf_ids(index)
        params = {"nlist": index.nlist, "pq_m": index.pq.M, "nprobe": index.nprobe}
    elif isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        slots = faiss.vector_to_array(index.id_map)
        ids = slots[slots >= 0]
        if isinstance(inner, faiss.IndexHNSWFlat):
            found = "hnsw"
            params = {
                "hnsw_m": inner.hnsw.nb_neighbors(1),
                "ef_construction": inner.hnsw.efConstruction,
                "ef_search": inner.hnsw.efSearch,
            }
        elif isinstance(inner, faiss.IndexFlat):
            found, params = "exact", {}
        else:
            raise ValueError(f"{path}: unsupported inner index {type(inner).__name__}")
    else:
        raise ValueError(f"{path}: unsupported faiss index {type(index).__name__}")
    return index, found, ids, params
