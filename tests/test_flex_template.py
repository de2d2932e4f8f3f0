"""The Dataflow Flex Template, checked offline (it cannot be built or launched here): its
metadata names exactly the CLI's ``run`` options, each labelled, explained and validated by a
regex that accepts the option's default and the README's example values; the launcher program
turns the template's ``--name=value`` flags into a command line the CLI accepts; the Dockerfile
is on Google's Python 3.11 launcher base and points the launcher at that program."""
import importlib.util
import json
import os
import re

import pytest

from beam_pipeline import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLEX = os.path.join(REPO, "flex_template")


def load_launcher():
    spec = importlib.util.spec_from_file_location("flex_main", os.path.join(FLEX, "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = load_launcher()


def metadata():
    with open(os.path.join(FLEX, "metadata.json")) as handle:
        return json.load(handle)


def parameters():
    return {p["name"]: p for p in metadata()["parameters"]}


def readme_section():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("### Dataflow Flex Template"):]
    return section[:section.index("\n## ")]


def readme_parameters():
    """The (name, value) pairs of the README's ``gcloud dataflow flex-template run`` command,
    with gcloud's ``^~^`` escaping (so values may hold commas)."""
    text = readme_section().replace("\\\n", " ")
    run = text[text.index("gcloud dataflow flex-template run"):]
    quoted = re.search(r"--parameters '\^(.)\^([^']*)'", run)
    separator, body = quoted.group(1), quoted.group(2)
    return [tuple(item.split("=", 1)) for item in body.split(separator)]


def as_template_value(default):
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, list):
        return ",".join(default)
    return str(default)


def test_metadata_names_exactly_the_run_options():
    options = launcher.run_options()
    params = parameters()
    assert len(params) == len(metadata()["parameters"])  # no name twice
    missing = sorted(set(options) - set(params))
    extra = sorted(set(params) - set(options))
    assert not missing and not extra, (
        f"flex_template/metadata.json lacks run options {missing} and names unknown ones {extra}")
    assert metadata()["name"] and metadata()["description"]
    for name, param in params.items():
        assert param["label"].strip() and param["helpText"].strip(), name
        assert param["isOptional"] is (not options[name].required), name
        assert param["regexes"], name
        for regex in param["regexes"]:
            # Dataflow checks the whole value; anchored patterns mean the same in Java and Python.
            assert regex.startswith("^") and regex.endswith("$"), (name, regex)
            re.compile(regex)
        if options[name].default is not None:  # the default itself is a valid value
            value = as_template_value(options[name].default)
            assert all(re.fullmatch(r, value) for r in param["regexes"]), (name, value)
        if options[name].choices:
            for choice in options[name].choices:
                assert all(re.fullmatch(r, choice) for r in param["regexes"]), (name, choice)
            assert not re.fullmatch(param["regexes"][0], "not-a-choice"), name


@pytest.mark.parametrize("name, value", [
    ("model", "/local/model.keras"), ("output", "gs://B/x"), ("batch_size", "0"),
    ("methods", "gradcam,nope"), ("overwrite", "yes"), ("max_error_rate", "1.5"),
    ("image_size", "224"), ("permutation_features", "patches:4"),
])
def test_metadata_regexes_refuse_bad_values(name, value):
    assert not any(re.fullmatch(r, value) for r in parameters()[name]["regexes"])


def test_readme_example_values_pass_the_regexes_and_the_cli():
    params = parameters()
    pairs = readme_parameters()
    names = [name for name, _ in pairs]
    assert {"model", "data", "output"} <= set(names)
    from apache_beam.options.pipeline_options import PipelineOptions

    beam_options = set(PipelineOptions([]).get_all_options())
    for name, value in pairs:
        if name in params:
            assert all(re.fullmatch(r, value) for r in params[name]["regexes"]), (name, value)
        else:  # Dataflow's own pipeline options pass through
            assert name in beam_options, name
    # What the launcher hands the CLI parses, and every leftover is a Beam option.
    args = launcher.to_cli_args([f"--{name}={value}" for name, value in pairs])
    parser = cli.build_parser()
    parsed, beam_args = parser.parse_known_args(["run", *args])
    cli._check_beam_args(parser, beam_args)
    values = dict(pairs)
    assert parsed.model == values["model"] and parsed.output == values["output"]
    assert parsed.methods == values["methods"].split(",")
    assert parsed.slice_bins == values["slice_bins"].split(";")
    assert parsed.overwrite is (values["overwrite"] == "true")


def test_launcher_turns_template_flags_into_the_cli_form():
    args = launcher.to_cli_args([
        "--model=gs://b/m.keras", "--image_column=path", "--overwrite=true",
        "--confidence_intervals=false", "--slice_bins=age=0,40,120;bmi=0,25,60",
        "--project=my-project", "--temp_location=gs://b/tmp"])
    assert args == ["--model", "gs://b/m.keras", "--image-column", "path", "--overwrite",
                    "--slice-bins", "age=0,40,120", "--slice-bins", "bmi=0,25,60",
                    "--project=my-project", "--temp_location=gs://b/tmp"]
    # A value the CLI refuses is refused the CLI's way (a usage error, exit 2).
    with pytest.raises(SystemExit) as info:
        launcher.main(["--model=gs://b/m.keras", "--data=gs://b/d", "--output=gs://b/o",
                       "--overwrite=maybe"])
    assert info.value.code == 2


def _instructions(path):
    text = re.sub(r"\\\n", " ", open(path).read())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_is_a_python_311_flex_template_launcher():
    instructions = _instructions(os.path.join(FLEX, "Dockerfile"))
    froms = [i.split()[1] for i in instructions if i.upper().startswith("FROM ")]
    assert froms == ["gcr.io/dataflow-templates-base/python311-template-launcher-base"]
    assert not [i for i in instructions if i.upper().startswith(("ENTRYPOINT", "CMD"))]
    env = " ".join(i for i in instructions if i.upper().startswith("ENV "))
    py_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", env).group(1)
    copies = [i.split()[1:] for i in instructions if i.upper().startswith("COPY ")]
    workdir = [i.split()[1] for i in instructions if i.upper().startswith("WORKDIR ")][-1]
    copied = {os.path.normpath(os.path.join(workdir, dest if len(srcs) == 1 else dest, ""))
              for *srcs, dest in copies}
    assert os.path.normpath(py_file) in copied  # the launcher program is in the image
    sources = " ".join(" ".join(c[:-1]) for c in copies)
    for needed in ("setup.py", "README.md", "beam_pipeline", "tfma_configs"):
        assert needed in sources, needed
    runs = " ".join(i for i in instructions if i.upper().startswith("RUN "))
    assert re.search(r"pip install --no-cache-dir (\S+ )*\.(\s|$)", runs), runs


def test_readme_documents_build_and_run():
    section = readme_section()
    for needed in ("gcloud dataflow flex-template build", "gcloud dataflow flex-template run",
                   "--metadata-file flex_template/metadata.json", "--sdk-language PYTHON",
                   "-f flex_template/Dockerfile", "sdk_container_image"):
        assert needed in section, needed
