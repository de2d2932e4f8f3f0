"""The README's Dataflow dry run with a ``gs://`` output, in a process that has no network.

The console script runs in a subprocess whose ``sitecustomize`` (tests/offline/) installs an
audit hook: every internet socket connection and host lookup fails at once and is recorded, and
so is any opening of a Google credential file. A dry run must exit 0 having attempted neither.
Cloud model or data paths cannot be planned offline: a dry run refuses them at once (exit 1).
"""
import os
import re
import subprocess
import sys

import numpy as np

from beam_pipeline import cli
from conftest import gap_model, make_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = os.path.join(REPO, "tests", "offline")


def readme_dry_run_command():
    """The dry-run command of the README's "Check before you submit, offline" paragraph."""
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("**Check before you submit, offline.**"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return block.replace("\\\n", " ").split()


def offline_env(tmp_path):
    """The environment of a subprocess that has no network, with credentials to tempt it."""
    credentials = tmp_path / "credentials.json"
    credentials.write_text('{"type": "service_account", "project_id": "my-project"}')
    gcloud = tmp_path / "gcloud-config"
    gcloud.mkdir()
    (gcloud / "application_default_credentials.json").write_text('{"type": "authorized_user"}')
    log = tmp_path / "network-attempts.log"
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([OFFLINE, REPO, env.get("PYTHONPATH", "")]),
        "XAI_TEST_OFFLINE_LOG": str(log),
        "XAI_TEST_CREDENTIAL_PATHS": os.pathsep.join([str(credentials), str(gcloud)]),
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
        "CLOUDSDK_CONFIG": str(gcloud),
    })
    return env, log


def test_readme_dry_run_with_a_gs_output_needs_no_network(tmp_path):
    command = readme_dry_run_command()
    assert command[:2] == ["xai-audit", "run"]
    assert "--dry_run" in command and "--no_auth" in command
    output = command[command.index("--output") + 1]
    assert output.startswith("gs://")
    # The command's own relative paths, made in its working folder.
    model = command[command.index("--model") + 1]
    data = command[command.index("--data") + 1]
    gap_model(num_classes=2).save(tmp_path / model)
    make_manifest(str(tmp_path / os.path.dirname(data)), np.random.default_rng(3), n=6,
                  num_classes=2)
    assert os.path.basename(data) == "manifest.csv"
    env, log = offline_env(tmp_path)
    script = os.path.join(os.path.dirname(sys.executable), "xai-audit")
    # Offline, Google's clients retry for minutes before failing: the bound is far above a
    # dry run's few seconds and far below those retries.
    proc = subprocess.run([script, *command[1:]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)

    attempts = log.read_text().splitlines() if log.exists() else []
    assert attempts == [], attempts[:10]  # no lookup, no connection, no credential read
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"{output} is not checked offline" in proc.stderr
    assert "Nothing was submitted" in proc.stderr
    # The guard is live in that process: a probe in the same environment is refused and logged.
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; socket.create_connection(('example.com', 443))"],
        env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "offline test" in probe.stderr
    assert "example.com" in log.read_text()


def test_a_dry_run_refuses_cloud_inputs_at_once(tmp_path, rng, capsys):
    manifest = make_manifest(str(tmp_path / "data"), rng, n=4, masks=False)
    command = readme_dry_run_command()[2:]
    for option, value in (("--model", "gs://my-bucket/models/model.keras"),
                          ("--data", manifest)):
        command[command.index(option) + 1] = value
    code = cli.main(["run", *command, "--tfma-config", "gs://my-bucket/eval.pbtxt"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("xai-audit: error:") == 1
    message = " ".join(err.split())
    assert "--model gs://my-bucket/models/model.keras" in message
    assert "--tfma-config gs://my-bucket/eval.pbtxt" in message
    assert "--data" not in message.split("cannot read")[0]  # local data is not named
    assert "a dry run plans the job offline" in message
