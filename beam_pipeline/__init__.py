"""xai-audit: a dataset-scale explainability and evaluation audit for Keras image classifiers.

Data flows one way (README.md, "Development", has the diagram):
``sources`` (which examples exist; ``source_*`` per kind of data, ``paths`` for file systems)
→ ``decode`` (bytes to model-ready arrays) → explain (``explainers``, ``attribution_methods``,
``layer_sweep``; every method is one record of ``method_registry``) → rows (``rows``, plain
functions; ``pipeline``, the Beam layer; ``schemas``) → Parquet, TFMA (``evaluation``,
``tfma_config``, ``tfma_gates``; ``metric_rules`` names the slices), ``importance`` and
``quality`` → run.json (``job``, ``outputs``, ``runinfo``) → the report (``report``,
``report_summary`` over ``report_scan``, ``report_metrics``, ``report_verdict``,
``report_measures``; ``results``, ``report_text``, ``report_plots``, ``report_gallery``; none of
them imports TensorFlow). ``layout`` names every output under DIR, ``errors`` holds every
exception type, ``cli`` is the command line, ``demo``/``demo_job`` the synthetic dataset, model
and story.
``sources`` (which examples exist) → ``decode`` (bytes to model-ready arrays) → explain
(``explainers``, ``attribution_methods``, ``layer_sweep``; every method is one record of
``method_registry``) → rows (``rows``, ``explain_batch``: plain functions; ``pipeline`` wires the
Beam layer: ``beam_stages``, ``importance_stage``, ``model_holder``; ``schemas``) → Parquet, TFMA
(``evaluation``), ``importance`` and ``quality`` → run.json (``job``: ``plan``, ``launch``,
``run_manifest``; ``outputs``, ``runinfo``)
→ the report (``report``, ``report_summary``, ``results``, ``report_text``, ``report_plots``,
``report_gallery``; none of them imports TensorFlow). ``layout`` names every output under DIR,
``errors`` holds every exception type, ``cli`` is the command line, ``demo``/``demo_job`` the
synthetic dataset, model and story.
"""

__version__ = "0.1.0"
