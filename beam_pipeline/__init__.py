"""xai-audit: a dataset-scale explainability and evaluation audit for Keras image classifiers.

The package is laid out along the one way data flows through the job:
``sources`` (what examples exist) → ``decode`` (bytes to model-ready arrays) → ``explainers``
(batched predictions and attribution maps, pure TensorFlow) → ``pipeline`` (the thin Beam layer
and the Parquet writers) → ``runinfo`` (run.json). ``cli`` is the command line, ``demo`` the
synthetic dataset and model.
"""

__version__ = "0.1.0"

# Beam's worker processes (multi_processing) import this package before TensorFlow when they
# unpickle the job's first transforms: there, as in the launcher, TF's start-up lines stay out
# of the default output (the CLI sets the variable; --log-level debug does not).
if __import__("os").environ.get("XAI_AUDIT_QUIET_TF") == "1":
    from .worker_logs import import_tensorflow_quietly

    import_tensorflow_quietly()
