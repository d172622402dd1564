"""Scale-out encoding with Ray Data: a collection of image files -> shards of global vectors.

The pipeline (see ``docs/SCALE_OUT.md``)::

    paths --from_items--> decode_batch (CPU tasks: Extractor.prepare [+ SIFT keypoints])
          --> EncodeActor (actor pool, one Encoder + one Extractor per actor, CPU or GPU)
          --> write_shard (tasks: one shard-<id>.npz + shard-<id>.failures.jsonl per batch)

Modules: :mod:`~selret.distributed.stages` (the decode and encode stages, plain Python),
:mod:`~selret.distributed.shards` (the shard files: format, writing, reading),
:mod:`~selret.distributed.encode` (the driver, :func:`encode_collection`) and
:mod:`~selret.distributed.ingest` (shards -> indexes). Everything public is re-exported here.

A rerun on the same output folder encodes only the paths no shard holds yet (failed ones are
retried). Shards are then added to an :class:`~selret.search.store.ImageIndex` or a
:class:`~selret.search.engine.SearchEngine` (:func:`ingest_shards`), or each turned into its own
index for :class:`~selret.search.sharded.ShardedSearch` (:func:`shard_indexes`).

Ray and torch are imported inside the functions that need them: reading shards needs neither.
"""

from selret.distributed.encode import EncodeSummary, encode_collection
from selret.distributed.ingest import IngestReport, ingest_shards, shard_indexes
from selret.distributed.shards import (
    DEFAULT_SHARD_ROWS,
    SHARD_FORMAT_VERSION,
    Shard,
    iter_shards,
    list_shards,
    load_shard,
    read_failures,
    write_shard,
)
from selret.distributed.stages import EncodeActor, decode_batch

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "SHARD_FORMAT_VERSION",
    "EncodeActor",
    "EncodeSummary",
    "IngestReport",
    "Shard",
    "decode_batch",
    "encode_collection",
    "ingest_shards",
    "iter_shards",
    "list_shards",
    "load_shard",
    "read_failures",
    "shard_indexes",
    "write_shard",
]
