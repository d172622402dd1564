"""selret: selective deep convolutional features for image retrieval.

The pipeline, one package per stage: ``features`` (images -> conv maps, through one
``features.extractor.Extractor``) -> ``encoding`` (masks, local PCA, embeddings, aggregation,
post-processing, chained by ``encoding.encoder.Encoder``; shipped ``encoding.pretrained`` encoders)
-> ``search`` (vector index, persistent store, engine); ``evaluation``, ``service``,
``distributed`` and ``cli`` build on them. See docs/ARCHITECTURE.md.
"""

__version__ = "0.2.0"
