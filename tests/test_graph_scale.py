"""The Dataflow job graph does not grow with the dataset: a manifest is enumerated by the
workers (the graph carries its URI, not its rows), so 8 rows and 100,000 rows translate to
graphs of the same size, far under Dataflow's 10 MB, with no example id inside. (A dry run with
a 1,000,000-row manifest measured 684,770 bytes: README, "Scale on Dataflow".)"""
import csv
import os

from beam_pipeline.job import run as job
from beam_pipeline.beam import pipeline
from conftest import gap_model
from test_dataflow import DATAFLOW_ARGS, GRAPH_LIMIT, unpickled_corpus


def write_manifest(folder, rows):
    """A manifest of ``rows`` examples; the images need not exist to plan and translate."""
    os.makedirs(folder)
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "label", "site"])
        for i in range(rows):
            writer.writerow([f"row{i:07d}", f"img/{i:07d}.png", i % 2, f"s{i % 4}"])
    return path


def translated_graph(model, manifest, output):
    plan = job.plan_audit(job.AuditRequest(model=model, data=manifest, output=output))
    p = job.make_pipeline([*DATAFLOW_ARGS, "--dry_run=True", "--no_auth"])
    pipeline.build_pipeline(p, plan.config)
    return p.run().job.proto_pipeline.SerializeToString()


def test_graph_size_does_not_grow_with_the_manifest(tmp_path):
    model = str(tmp_path / "model.keras")
    gap_model(num_classes=2).save(model)
    sizes = {}
    for rows in (8, 100_000):
        manifest = write_manifest(str(tmp_path / f"data{rows:07d}"), rows)
        graph = translated_graph(model, manifest, f"gs://my-bucket/audits/r{rows:07d}")
        sizes[rows] = len(graph)
        assert manifest.encode() in unpickled_corpus(graph)  # the workers get the URI
    print(f"serialized graph: {sizes} bytes")
    assert abs(sizes[100_000] - sizes[8]) < 1024  # paths differ by nothing but their digits
    assert sizes[100_000] < GRAPH_LIMIT / 10
    corpus = unpickled_corpus(graph)
    assert b"row0099999" not in corpus and b"img/0050000.png" not in corpus
