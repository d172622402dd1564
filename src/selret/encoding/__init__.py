"""Stage 2, feature maps -> global vectors: masks, local PCA, embeddings, aggregation,
post-processing, the ``Encoder`` that chains them, presets and the shipped pre-trained encoders.
Imports only :mod:`selret.features` (and the shared base modules)."""
