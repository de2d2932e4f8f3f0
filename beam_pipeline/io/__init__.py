"""Inputs and outputs: which examples exist (``sources``: class folders, manifests, TFRecords →
``records.ExampleRef``), bytes to arrays (``decode``), input limits, Arrow schemas, every output
name and path under DIR (``layout``), the staging folder and its promotion (``outputs``), run.json
fields and small Parquet readers (``runinfo``).
"""
