"""xai-audit: a dataset-scale explainability and evaluation audit for Keras image classifiers.

Data flows one way (README.md, "Development", has the diagram), one subpackage per concern:

* ``io``: which examples exist (``sources`` over ``source_folders`` / ``source_manifest`` /
  ``source_tfrecord``; ``paths`` for file systems), bytes to arrays (``decode``), schemas,
  every output name under DIR (``layout``), staging (``outputs``), run.json fields (``runinfo``).
* ``explain``: one record per method (``registry``), the methods (``explainers``,
  ``attribution_methods``, ``layer_sweep``), safe loading (``model_io``), bfloat16
  (``precision``), and the pure per-batch functions that make rows (``explain_batch``, ``rows``).
* ``beam``: the thin Beam layer — the graph (``pipeline``), DoFns (``stages``,
  ``importance_stage``), the per-worker model (``model_holder``), ``AuditConfig``.
* ``measures``: permutation importance, faithfulness and sanity (``quality``), ``intervals``,
  attention by slice, and the readings the report needs (``results``).
* ``evaluation``: TFMA (``transform``, ``tfma_config``, ``tfma_gates``), the baseline gates and
  the one rule for slice names and undefined metrics (``metric_rules``).
* ``job``: plan, launch, run, count, gate, run.json (``run_manifest``), the cost estimate.
* ``report``: the compliance report and the terminal summary, from DIR's files only (no
  TensorFlow, no Beam runner).
* ``demo``: the synthetic demo and the Fashion-MNIST example.

``errors`` holds every exception type (each with its exit code); ``cli`` is the command line.
"""

__version__ = "0.1.0"
