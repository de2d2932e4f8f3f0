"""Explaining: load the model safely, capture its layers, and compute the attribution maps.

``registry`` holds one record per method (factory, resolution, extra columns, display name,
note, options with defaults and checks; no TensorFlow); ``explainers`` the ``Attribution``
contract and Grad-CAM / Grad-CAM++; ``attribution_methods`` CAM, Saliency, SmoothGrad,
Integrated Gradients and ``make_method``; ``layer_sweep`` Grad-CAM at many layers; ``model_io``
safe loading and layer lookup; ``rows`` the pure functions that turn one batch's arrays into
output rows. Adding a method is a class here plus one ``registry.METHODS`` entry.
"""
