"""Evaluation and gates: TFMA configs, the TFMA transform and its results (``transform``), the
default baseline gates (``baseline``), and the one rule for undefined and trivial slice metrics
(``metric_rules``). Importing this package does not import TFMA; ``transform`` does.
"""
