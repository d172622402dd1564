"""selret: selective deep convolutional features for image retrieval.

The pipeline, one module per stage: ``io`` -> ``backbones`` -> ``masks`` -> ``preprocessing``
-> ``embeddings`` -> ``aggregation`` -> ``postprocessing``, chained by ``encoder.Encoder``;
``index`` searches the resulting vectors. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
