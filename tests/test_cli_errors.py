"""Careless command lines get one paragraph and the right exit code, never a traceback: 2 for a
malformed value (argparse), 1 for a value that cannot be honoured, refused before anything is
written; and a run that audited nothing still writes its report (exit 4)."""
import json
import os

import keras
import pandas as pd
import pytest

from beam_pipeline import cli
from conftest import IMAGE_SIZE, make_manifest
from test_job import run_cli


@pytest.mark.parametrize("option, value", [
    ("--seed", "-1"), ("--smoothgrad-samples", "0"), ("--ig-steps", "0"),
    ("--smoothgrad-sigma", "-1"), ("--smoothgrad-sigma", "nan"), ("--batch-size", "0"),
    ("--max-error-rate", "1.5"), ("--map-size", "x"), ("--output", ""), ("--output", "  "),
    ("--model", ""),
])
def test_a_malformed_value_is_a_usage_error(tmp_path, capsys, option, value):
    argv = {"--model": "m.keras", "--data": "d", "--output": str(tmp_path / "out"),
            option: value}
    args = ["run", *[x for kv in argv.items() for x in kv]]
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("small")
    from conftest import gap_model

    gap_model(num_classes=3).save(root / "model.keras")
    manifest = make_manifest(str(root / "data"), np.random.default_rng(0), n=3, masks=False)
    return root, str(root / "model.keras"), manifest


@pytest.mark.parametrize("case, needle", [
    ("runner", "--runner NoSuchRunner"),
    ("output_file", "is an existing file"),
    ("empty_tfma", "names no metrics"),
    ("metricless_tfma", "names no metrics"),
    ("unknown_metric", "NoSuchMetric"),
    ("html_layer", "<img src=x onerror=alert(1)>"),
    ("long_layer", "block_" * 30),  # a name longer than a line stays whole, copy-pastable
])
def test_an_option_that_cannot_be_honoured_exits_1_before_anything_is_written(
        small, tmp_path, capsys, case, needle):
    root, model, manifest = small
    out = tmp_path / "out"
    extra = []
    if case == "runner":
        extra = ["--runner", "NoSuchRunner"]
    elif case == "output_file":
        out = tmp_path / "a_file.txt"
        out.write_text("mine")
    elif case.endswith("tfma") or case == "unknown_metric":
        config = tmp_path / "eval.pbtxt"
        config.write_text({"empty_tfma": "", "metricless_tfma": "slicing_specs {}",
                           "unknown_metric": 'metrics_specs { metrics { class_name: '
                                             '"NoSuchMetric" } }'}[case])
        extra = ["--tfma-config", config]
    elif case.endswith("_layer"):
        extra = ["--layer", needle]
    code = run_cli("run", "--model", model, "--data", manifest, "--output", out, *extra)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and needle in err and "Traceback" not in err, err
    assert err.count("xai-audit: error:") == 1
    if case == "output_file":
        assert out.read_text() == "mine"
    else:
        assert not out.exists()  # refused at planning: not even the folder was made


def test_report_on_a_run_json_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "run.json").write_text("[1, 2, 3]")
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "JSON list" in err and "Traceback" not in err


def test_a_run_that_audited_nothing_still_writes_its_report(tmp_path):
    """Every image missing (with masks and TFMA on), and a linear single-unit head: exit 4, the
    report says nothing was audited and shows the model caveat."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(1, name="logit")(x)).save(tmp_path / "m.keras")
    rows = [{"id": f"x{i}", "image": f"gone/{i}.png", "mask": f"gone/{i}_m.png",
             "label": i % 2, "site": f"s{i % 2}"} for i in range(12)]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "out"
    assert run_cli("run", "--model", tmp_path / "m.keras", "--data", tmp_path / "manifest.csv",
                   "--output", out) == 4
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["examples_ok"] == 0 and run["counts"]["examples_failed"] == 12
    assert "no example could be audited" in run["tfma"]["skipped_because"]
    assert "from_logits" in run["model"]["caveats"][0]
    assert "run.json" not in run["output_files"]
    assert {"attributions", "errors"} <= {f.split("/")[0] for f in run["output_files"]}
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["verdict"]["status"] == "failed"
    assert summary["verdict"]["failed"][0].startswith("Nothing was audited: all 12 examples")
    html = (out / "report" / "index.html").read_text()
    assert "Nothing was audited" in html and "Model caveat" in html
    assert not (out / ".xai-audit.lock").exists()


def _run_actions():
    import argparse

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in commands.choices["run"]._actions if a.dest != "help"}


def _as_help_text(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return ",".join(default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_run_defaults_are_written_once_in_the_request():
    """The run options' defaults are AuditRequest's: an option left out reaches the request as
    the dataclass default, and the [default] each help text shows is that same value."""
    import argparse
    import re
    from dataclasses import MISSING, fields

    from beam_pipeline.explain import registry as method_registry
    from beam_pipeline.job.run import AuditRequest

    actions = _run_actions()
    args, _ = cli.build_parser().parse_known_args(
        ["run", "--model", "m.keras", "--data", "d", "--output", "o"])
    assert cli._request_from_args(args) == AuditRequest(model="m.keras", data="d", output="o")
    checked = 0
    for field in fields(AuditRequest):
        action = actions.get(field.name)
        if action is None or field.default is MISSING or isinstance(
                action, argparse._StoreTrueAction):
            continue
        if field.name not in method_registry.OPTIONS:  # the registry holds those defaults
            assert action.default is None, f"--{field.name} writes its default a second time"
        shown = re.search(r"\[([^\]]*)\]$", action.help or "")
        if shown is None or field.default is None:
            continue  # no default, or one the help describes in words
        assert shown.group(1).split(": ")[0] == _as_help_text(field.default), field.name
        checked += 1
    assert checked >= 20
