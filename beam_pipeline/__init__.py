"""xai-audit: a dataset-scale explainability and evaluation audit for Keras image classifiers.

The package is laid out along the one way data flows through the job:
``sources`` (what examples exist) → ``decode`` (bytes to model-ready arrays) → ``explainers``
(batched predictions and attribution maps, pure TensorFlow) → ``pipeline`` (the thin Beam layer
and the Parquet writers) → ``runinfo`` (run.json). ``cli`` is the command line, ``demo`` the
synthetic dataset and model.
"""

__version__ = "0.1.0"
