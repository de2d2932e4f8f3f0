"""The synthetic demo (dataset, model, story: ``data``, ``run``) and the Fashion-MNIST
real-data example (``fashion``).
"""
