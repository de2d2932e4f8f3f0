"""Helpers shared by test files (imported as ``from helpers import ...``; pytest puts tests/ on
the path): running the CLI in-process, reading a run's outputs back, the accounting identity, and
the attribution columns a default run writes."""
import json
import os

import pandas as pd

from beam_pipeline import cli

BASE_COLUMNS = {"example_id", "label", "predicted_class", "probabilities", "target_class",
                "attention_region",
                "gradcam", "gradcam_shape", "gradcam_layer",
                "gradcam_deletion_auc", "gradcam_insertion_auc",  # faithfulness: sampled rows
                "random_deletion_auc", "random_insertion_auc"}  # and its random-map reference
MASK_COLUMNS = {"gradcam_mask_energy", "gradcam_pointing_hit", "gradcam_iou", "mask_area"}


def run_cli(*args):
    return cli.main([str(a) for a in args])


def read_outputs(out):
    attributions = pd.read_parquet(os.path.join(out, "attributions"))
    errors = pd.read_parquet(os.path.join(out, "errors"))
    with open(os.path.join(out, "run.json")) as handle:
        run = json.load(handle)
    return attributions, errors, run


def assert_accounting(attributions, errors, expected_ids):
    ok, failed = list(attributions.example_id), list(errors.example_id)
    assert len(ok) == len(set(ok)) and len(failed) == len(set(failed))
    assert not set(ok) & set(failed)
    assert set(ok) | set(failed) == set(expected_ids)
