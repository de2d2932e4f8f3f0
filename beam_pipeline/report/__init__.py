"""The compliance report, from the files of DIR only (no TensorFlow, no Beam runner): figures
(``summary``), sentences (``text``), charts (``plots``), the gallery, the attention sections, the
glossary, the HTML (``render`` + ``templates/``) and the end-of-run terminal summary.
"""
