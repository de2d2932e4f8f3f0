"""The Beam layer, kept thin: the graph (``pipeline``), the DoFns that hold a model per worker
and call the pure functions of ``explain`` and ``measures``, progress lines and worker log
forwarding.
"""
