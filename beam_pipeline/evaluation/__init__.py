"""Evaluation and gates: the TFMA transform (``transform``), the EvalConfig's loading and checks
(``tfma_config``), TFMA's results and the threshold and slice-gap gates (``tfma_gates``), the
default baseline gates (``baseline``), and the one rule for slice names and undefined or trivial
slice metrics (``metric_rules``). Importing this package does not import TFMA; ``transform`` and
``tfma_config`` do.
"""
