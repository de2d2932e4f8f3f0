"""``xai-audit report DIR`` on a finished run works where TensorFlow cannot be imported: the report
reads files (run.json, Parquet) and the method registry, never a model."""
import json
import os
import subprocess
import sys

from beam_pipeline import cli

# Makes ``import tensorflow`` (and Keras, TFMA, which load it) fail, then re-renders the report
# through the console entry point and says which TensorFlow modules got loaded (none).
_WITHOUT_TF = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tensorflow_model_analysis", "tf_keras"):
            raise ImportError(f"{name} is not importable here")

sys.meta_path.insert(0, NoTensorFlow())
from beam_pipeline import cli
code = cli.main(["report", sys.argv[1]])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print("RESULT", code, loaded)
"""


def test_report_renders_a_finished_run_without_tensorflow(tmp_path, manifest_dataset,
                                                           saved_model):
    out = tmp_path / "out"
    assert cli.main(["run", "--model", saved_model, "--data", manifest_dataset, "--output",
                     str(out), "--methods", "gradcam,integrated_gradients", "--ig-steps", "4",
                     "--layer", "all", "--sanity-sample", "4", "--faithfulness-sample", "4",
                     "--permutation-repeats", "1"]) in (0, 3)
    index = out / "report" / "index.html"
    first = json.loads((out / "report" / "summary.json").read_text())
    index.unlink()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))),
         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TF, str(out)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert "RESULT 0 []" in proc.stdout, proc.stderr[-2000:]
    assert index.exists()
    again = json.loads((out / "report" / "summary.json").read_text())
    # The same figures as the report the run wrote with TensorFlow at hand.
    for section in ("verdict", "localization", "layer_sweep", "sanity", "faithfulness",
                    "importance"):
        assert again.get(section) == first.get(section), section
    assert first["layer_sweep"] and first["sanity"] and first["localization"]
