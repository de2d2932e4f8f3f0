"""Text-format TFMA ``EvalConfig``s to copy and edit; ``--tfma-config`` picks one.

``binary.pbtxt`` and ``multiclass.pbtxt`` are the defaults (chosen by the model's number of
classes); ``binary_with_thresholds.pbtxt`` shows global and per-slice gates. The job fills in
what depends on the run (label / prediction keys, the overall slice, one slice per slice column,
the attribution slices, the class ids to binarize), so these files stay model-independent.
"""
