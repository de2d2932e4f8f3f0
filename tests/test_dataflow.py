"""Ready for Dataflow, checked offline: the real pipeline translates with DataflowRunner options
and Beam's ``--dry_run=True --no_auth`` (no network, nothing submitted), its serialized graph is
far under Dataflow's 10 MB cap with no model weights inside, the command-line dry run touches
nothing at the output location, ``setup.py`` works as a ``--setup_file``, and the Dockerfile is
a Beam custom container for the pinned Beam version (checked statically: it cannot be built here).
"""
import base64
import bz2
import json
import logging
import os
import re
import socket
import tarfile
import zlib

import apache_beam as beam
import keras
import numpy as np
import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from beam_pipeline import cli
from beam_pipeline.job import run as job
from beam_pipeline.beam import pipeline
from conftest import IMAGE_SIZE, LogLines, make_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "europe-west1-docker.pkg.dev/my-project/xai/xai-audit:0.1.0"
DATAFLOW_ARGS = ["--runner", "DataflowRunner", "--project", "my-project", "--region",
                 "europe-west1", "--temp_location", "gs://my-bucket/tmp"]
GRAPH_LIMIT = 10 * 1024 * 1024


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (Unix sockets stay allowed)."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted in an offline test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


@pytest.fixture
def weighty_model(tmp_path):
    """A ~2 MB model whose weights are random (so any 64-byte run of them is unique)."""
    rng = np.random.default_rng(7)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(300, activation="relu", name="wide")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(x))
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.1, w.shape).astype("float32")
                           for w in layer.get_weights()])
    path = tmp_path / "weighty.keras"
    model.save(path)
    return str(path), model.get_layer("wide").kernel.numpy()


def unpickled_corpus(graph: bytes) -> bytes:
    """The graph plus every pickled payload in it, decompressed: Beam stores pickled DoFns and
    functions as base64 of bz2- or zlib-compressed pickles, where raw bytes would not show."""
    parts = [graph]
    for blob in re.findall(rb"[A-Za-z0-9+/]{64,}={0,2}", graph):
        try:
            packed = base64.b64decode(blob, validate=True)
        except ValueError:
            continue
        for decompress in (bz2.decompress, zlib.decompress):
            try:
                parts.append(decompress(packed))
                break
            except (OSError, ValueError, zlib.error):
                continue
    assert len(parts) > 10, "expected pickled DoFns in the graph"
    return b"\n".join(parts)


def _translate(model, data, output, extra=()):
    """The real plan and build_pipeline, run on the DataflowRunner in dry-run mode."""
    plan = job.plan_audit(job.AuditRequest(model=model, data=data, output=output,
                                           methods=["gradcam", "saliency"]))
    p = job.make_pipeline([*DATAFLOW_ARGS, "--dry_run=True", "--no_auth", *extra])
    pipeline.build_pipeline(p, plan.config)
    result = p.run()
    return result, result.job.proto_pipeline


def test_dataflow_dry_run_translates_a_small_graph_without_weights(
        tmp_path, rng, weighty_model, no_network):
    model_path, kernel = weighty_model
    manifest = make_manifest(str(tmp_path / "data"), rng, n=8, num_classes=2)
    result, proto = _translate(model_path, manifest, str(tmp_path / "out"),
                               ["--sdk_container_image", IMAGE, "--sdk_location", "container"])

    assert result.state == beam.runners.runner.PipelineState.DONE  # translated, not submitted
    graph = proto.SerializeToString()
    size = len(graph)
    print(f"serialized Dataflow pipeline graph: {size} bytes ({100 * size / GRAPH_LIMIT:.2f}% of "
          "the 10 MB limit)")
    assert size < GRAPH_LIMIT / 10  # well under: a tenth of the cap
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"Explain", "WriteAttributions", "WriteErrors", "Evaluate", "Importance"} <= names

    # No weights in the graph: neither the model file's bytes nor the raw float32 weights, in
    # the graph or in any pickled DoFn inside it (Beam stores those compressed).
    corpus = unpickled_corpus(graph)
    assert model_path.encode() in corpus  # the workers get the path and load the model
    model_bytes = open(model_path, "rb").read()
    assert len(model_bytes) > 1_000_000
    for offset in range(0, len(model_bytes) - 64, len(model_bytes) // 16):
        assert model_bytes[offset:offset + 64] not in corpus
    raw = kernel.astype("<f4").tobytes()
    for offset in (0, len(raw) // 3, len(raw) // 2, len(raw) - 64):
        assert raw[offset:offset + 64] not in corpus

    # The workers run our container image.
    images = {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in proto.components.environments.values()
              if env.urn == "beam:env:docker:v1"}
    assert images == {IMAGE}
    assert no_network == []


def test_setup_file_builds_an_sdist_with_the_tfma_configs(tmp_path, rng, saved_model, no_network):
    """The --setup_file alternative: Beam builds setup.py's sdist offline and stages it."""
    manifest = make_manifest(str(tmp_path / "data"), rng, n=6, masks=False)
    _, proto = _translate(saved_model, manifest, str(tmp_path / "out"),
                          ["--setup_file", os.path.join(REPO, "setup.py")])
    staged = {}
    for env in proto.components.environments.values():
        for dep in env.dependencies:
            role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload)
            staged[role.staged_name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(
                dep.type_payload).path
    assert "workflow.tar.gz" in staged
    with tarfile.open(staged["workflow.tar.gz"]) as sdist:
        names = sdist.getnames()
    for needed in ("setup.py", "beam_pipeline/job/run.py", "beam_pipeline/beam/pipeline.py",
                   "beam_pipeline/report/templates/report.html.j2",
                   "tfma_configs/binary.pbtxt", "tfma_configs/multiclass.pbtxt"):
        assert any(n.endswith("/" + needed) for n in names), needed
    assert no_network == []


@pytest.fixture
def xai_log():
    logger = logging.getLogger("xai_audit")
    collect = LogLines()
    logger.addHandler(collect)
    yield collect.lines
    logger.removeHandler(collect)


def _snapshot(folder):
    found = {}
    for dirpath, dirnames, files in os.walk(folder):
        for name in dirnames + files:
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            data = open(path, "rb").read() if os.path.isfile(path) else None
            found[os.path.relpath(path, folder)] = (stat.st_mtime_ns, data)
    return found


def test_cli_dry_run_exits_0_and_touches_nothing_at_the_output(
        tmp_path, rng, saved_model, no_network, xai_log):
    manifest = make_manifest(str(tmp_path / "data"), rng, n=6)
    fresh = tmp_path / "fresh"
    argv = ["run", "--model", saved_model, "--data", manifest, *DATAFLOW_ARGS, "--dry_run",
            "--no_auth"]
    assert cli.main([*argv, "--baseline-gates", "off", "--output", str(fresh)]) == 0
    assert not fresh.exists()
    assert any("Dry run" in line and "bytes" in line for line in xai_log), xai_log

    # A folder holding an earlier run: the dry run says the real run would refuse it, and
    # leaves every file exactly as it was.
    earlier = tmp_path / "earlier"
    (earlier / "attributions").mkdir(parents=True)
    (earlier / "run.json").write_text(json.dumps({"run_id": "old"}))
    (earlier / "attributions" / "part-00000-of-00001.parquet").write_bytes(b"old rows")
    (earlier / "notes.txt").write_text("mine")
    before = _snapshot(earlier)
    assert cli.main([*argv, "--baseline-gates", "off", "--output", str(earlier)]) == 0
    assert _snapshot(earlier) == before
    assert any("would refuse" in line for line in xai_log)
    assert no_network == []


@pytest.mark.parametrize("change, needle", [
    (("--temp_location", "gs://B/tmp"), "temp_location"),  # not a valid bucket name
    (("--project", "P"), "Project ID"),
    (("--runner", "FnApiRunner"), "needs --runner DataflowRunner"),
])
def test_dry_run_refuses_options_dataflow_would_refuse(
        tmp_path, rng, saved_model, capsys, no_network, change, needle):
    manifest = make_manifest(str(tmp_path / "data"), rng, n=4, masks=False)
    args = list(DATAFLOW_ARGS)
    args[args.index(change[0]) + 1] = change[1]
    code = cli.main(["run", "--model", saved_model, "--data", manifest, "--output",
                     str(tmp_path / "out"), *args, "--dry_run", "--no_auth"])
    assert code == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert no_network == []


def test_a_real_dataflow_run_refuses_local_paths(tmp_path, rng, saved_model, capsys):
    manifest = make_manifest(str(tmp_path / "data"), rng, n=4, masks=False)
    code = cli.main(["run", "--model", saved_model, "--data", manifest, "--output",
                     "gs://my-bucket/audit", *DATAFLOW_ARGS])
    assert code == 1
    err = capsys.readouterr().err
    assert "--model" in err and "--data" in err and "gs://" in err


# --------------------------------------------------------------------------- the container


def _dockerfile_instructions():
    text = open(os.path.join(REPO, "Dockerfile")).read()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerfile_is_a_beam_container_for_the_pinned_versions():
    instructions = _dockerfile_instructions()
    setup = open(os.path.join(REPO, "setup.py")).read()
    beam_pin = re.search(r'"apache-beam\[gcp\]==([0-9.]+)\.\*"', setup).group(1)  # e.g. 2.77
    python = re.search(r'python_requires=">=(3\.\d+)', setup).group(1)
    froms = [i for i in instructions if i.upper().startswith("FROM ")]
    assert len(froms) == 1
    image = froms[0].split()[1]
    match = re.fullmatch(r"apache/beam_python(3\.\d+)_sdk:(\d+\.\d+)\.(\d+)", image)
    assert match, image
    assert match.group(1) == python and match.group(2) == beam_pin
    assert image.split(":")[1] == beam.__version__  # the version the tests run on

    # Beam's boot entrypoint (/opt/apache/beam/boot) is kept: nothing overrides it.
    assert not [i for i in instructions if i.upper().startswith(("ENTRYPOINT", "CMD"))]
    copied = " ".join(i for i in instructions if i.upper().startswith("COPY "))
    for needed in ("setup.py", "README.md", "beam_pipeline", "tfma_configs"):
        assert needed in copied, needed
    runs = " ".join(i for i in instructions if i.upper().startswith("RUN "))
    assert re.search(r"pip install --no-cache-dir (\S+ )*\.(\s|$)", runs), runs
    # Every package setup.py ships is copied into the image.
    from setuptools import find_packages

    for package in find_packages(REPO, include=["beam_pipeline", "beam_pipeline.*",
                                                "tfma_configs"]):
        assert package.split(".")[0] in copied


def test_readme_documents_the_dataflow_command():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Run on Dataflow"):]
    section = section[:section.index("\n## ", 5)] if "\n## " in section[5:] else section
    for flag in ("--runner DataflowRunner", "--project", "--region", "--temp_location",
                 "--sdk_container_image", "--sdk_location container", "--setup_file",
                 "--dry_run", "--no_auth", "docker build", "FlinkRunner", "SparkRunner"):
        assert flag in section, flag
    # Every flag the documented commands pass is one the CLI accepts (no typos in the README).
    parser = cli.build_parser()
    commands = re.findall(r"xai-audit run[^`]*?(?=\n\n|```)", section, re.S)
    assert len(commands) == 3  # container, --setup_file, dry run
    for command in commands:
        args = command.replace("\\\n", " ").split()[1:]
        args, beam_args = parser.parse_known_args(args)
        cli._check_beam_args(parser, beam_args)
