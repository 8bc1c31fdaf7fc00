"""No secret in any log, param, artifact or pickle.

Recognisable secrets are set as a user would set them: AWS credentials in the environment
(of the Ray node and of every command; the moto S3 endpoint accepts any) and an MLflow
tracking URI with user:password in it (the MLflow client sends it as basic auth; the test
server ignores it). Pretraining, VTAB, export, analysis and compare run as the installed
commands on one Ray head of the test's own (its own temp dir, so that its session logs are
the only ones searched), with checkpoints and the VTAB storage on S3. Then every file written
is searched for the secrets: the S3 bucket, the MLflow store and artifacts, Ray's session
folder, the output folders, and each command's stdout and stderr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import NO_STATE_API, free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY_ID = "AKIAVITLEAKTEST00001"
SECRET_KEY = "vitLeakTestSecretKey/0123456789abcdefXYZ"
PASSWORD = "vitLeakTestMlflowPassword42"
SECRETS = (KEY_ID, SECRET_KEY, PASSWORD)


def find_secrets(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


def search_tree(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                found = find_secrets(path.read_bytes())
            except OSError:
                continue
            hits += [f"{path}: {s}" for s in found]
    return hits


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A Ray head whose processes have the AWS credentials in their environment, as a
    cluster node's would; -> (GCS address, temp dir, environment for the commands)."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))   # socket paths stay < 108 B
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server,
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_API_SERVER_ADDRESS": NO_STATE_API}     # no dashboard: see tests/conftest.py
    env.pop("AWS_PROFILE", None)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", f"--port={port}",
         "--include-dashboard=false", f"--temp-dir={temp}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, stdout=open(temp.parent / f"{temp.name}.log", "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("session_*/logs/raylet.out")):
            assert proc.poll() is None, (temp.parent / f"{temp.name}.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        yield address, temp, {**env, "RAY_ADDRESS": address}
    finally:
        stop_process_group(proc)
        shutil.rmtree(temp, ignore_errors=True)
        Path(temp.parent / f"{temp.name}.log").unlink(missing_ok=True)


def test_redact_strips_userinfo_from_every_uri_in_a_message():
    from pipeline.tracking import redact

    message = (f"API request to http://vit:{PASSWORD}@127.0.0.1:5000/api/2.0/x failed; "
               f"retry https://a:{PASSWORD}@mlflow.example.com")
    assert redact(message) == ("API request to http://127.0.0.1:5000/api/2.0/x failed; "
                               "retry https://mlflow.example.com")
    for plain in ("sqlite:////home/u/vit-runs/mlflow.db", "s3://bucket/key@v1", "file:///a@b"):
        assert redact(plain) == plain


def test_tune_trials_get_no_aws_variables(monkeypatch):
    """The runtime env Tune gives a trial actor (ray/tune/execution/class_cache.py) has no
    AWS variable inside `no_credentials_in_trial_env`, and has them outside it: the check
    fails if a Ray upgrade moves where Tune copies them."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from eval.tune_hooks import no_credentials_in_trial_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")

    def trial_env() -> dict:
        class Trainable:
            pass

        return _ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]

    assert KEY_ID in trial_env().values()            # what Tune does by itself
    with no_credentials_in_trial_env():
        assert not [k for k in trial_env() if k.startswith("AWS_")]
    assert KEY_ID in trial_env().values()            # restored afterwards


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_no_secret_is_written_anywhere(cluster, mlflow_server, tmp_path):
    import boto3

    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    address, ray_temp, env = cluster
    host = mlflow_server.uri.split("://", 1)[1]
    env = {**env, "MLFLOW_TRACKING_URI": f"http://vit:{PASSWORD}@{host}",
           "MLFLOW_EXPERIMENT_NAME": f"secrets-{tmp_path.name}", "HOME": str(tmp_path / "home")}
    s3 = boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                                        region_name="us-east-1", aws_access_key_id=KEY_ID,
                                        aws_secret_access_key=SECRET_KEY)
    bucket = f"secrets-{tmp_path.name.lower()[-20:].strip('-_')}"
    s3.create_bucket(Bucket=bucket)
    write_grating_task(tmp_path / "vtab", BY_NAME["kitti"], train=8, val=4, test=8)
    outputs = []

    def run(*args, timeout=600):
        out = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=timeout)
        outputs.append((args[0], out.stdout + out.stderr))
        assert out.returncode == 0, f"{args[0]}: {(out.stdout + out.stderr)[-3000:]}"
        return out

    run("vit-pretrain", "--preset", "smoke", "--name", "sec", "--out",
        f"s3://{bucket}/runs", "--set", "train.total_steps=20", "--set",
        "probe.every=0")
    ckpt = f"s3://{bucket}/runs/sec"
    run("vit-vtab", "--checkpoint", ckpt, "--data", tmp_path / "vtab", "--tasks", "kitti",
        "--resolution", "32", "--lrs", "0.01", "--steps", "4", "--batch-size", "8",
        "--out", f"s3://{bucket}/vtab", "--name", "sec-vtab")
    run("vit-export", "--checkpoint", ckpt, "--out", tmp_path / "export")
    run("vit-analyze", "--checkpoint", ckpt, "--data", tmp_path / "vtab" / "kitti",
        "--num-images", "8", "--rollout-images", "1", "--out", tmp_path / "analysis")
    run("vit-compare", "sec", "sec-vtab", "--out", tmp_path / "compare")

    hits = []
    for command, text in outputs:
        hits += [f"{command} output: {s}" for s in find_secrets(text.encode())]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith("runs/sec/step_") for k in keys) and "vtab/sec-vtab/vtab.json" in keys
    for key in keys:
        hits += [f"s3://{bucket}/{key}: {s}" for s in find_secrets(
            s3.get_object(Bucket=bucket, Key=key)["Body"].read())]
    sessions = list(ray_temp.glob("session_*/logs"))
    assert sessions and any(p.name.startswith("runtime_env_agent") for p in sessions[0].iterdir())
    hits += search_tree(ray_temp)                       # Ray's session logs, spilled objects
    hits += search_tree(Path(mlflow_server.root))       # MLflow's store, artifacts, server log
    hits += search_tree(tmp_path)                       # outputs, HOME
    assert not hits, "\n".join(hits)
