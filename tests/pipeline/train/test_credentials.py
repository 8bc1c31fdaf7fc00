"""Credentials that change mid-run, as instance-profile and IRSA credentials do every hour.

An S3 endpoint with authentication on (a moto server in its own process, with an IAM user
and two access keys), credentials served by a `credential_process` whose output the test
rotates, `jobs/pretrain.py` reading shards and writing checkpoints there. Mid-run the test
switches the process to the second key and deletes the first, so any process still holding
the first one is refused from then on. The run must keep checkpointing to the end.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, sqlite_store, stop_process_group

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def _wait_port(port: int, proc, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the S3 endpoint exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def _expiring(key: dict) -> str:
    # A short expiry, as temporary credentials have: SDKs refresh them before it passes.
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
    return json.dumps({"Version": 1, "AccessKeyId": key["AccessKeyId"],
                       "SecretAccessKey": key["SecretAccessKey"], "Expiration": until})


def test_a_run_keeps_reading_and_checkpointing_when_credentials_rotate(tmp_path):
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "moto.log"
    # Authentication on after the 4 set-up calls below (user, policy, two keys).
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=open(server_log, "w"),
                              start_new_session=True)
    try:
        _wait_port(port, server)
        admin = boto3.session.Session().client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
            aws_secret_access_key="setup")
        admin.create_user(UserName="trainer")
        admin.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}))
        first = admin.create_access_key(UserName="trainer")["AccessKey"]
        second = admin.create_access_key(UserName="trainer")["AccessKey"]

        current = tmp_path / "current.json"
        current.write_text(_expiring(first))
        script = tmp_path / "credentials.sh"
        script.write_text(f"#!/bin/sh\ncat {current}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        (tmp_path / "aws-config").write_text(
            f"[profile rotating]\ncredential_process = {script}\nregion = us-east-1\n")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
        env.update(AWS_CONFIG_FILE=str(tmp_path / "aws-config"), AWS_PROFILE="rotating",
                   AWS_ENDPOINT_URL=endpoint, PYTHONPATH=str(ROOT),
                   RAY_USAGE_STATS_ENABLED="0",
                   MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
        s3 = boto3.session.Session(aws_access_key_id=first["AccessKeyId"],
                                   aws_secret_access_key=first["SecretAccessKey"],
                                   region_name="us-east-1").client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="rotation")

        make = subprocess.run(
            [sys.executable, "jobs/make_shards.py", "synthetic", "--out", "s3://rotation/data",
             "--num-samples", "1280", "--num-classes", "4", "--image-size", "48",
             "--val-fraction", "0", "--shard-size-mb", "0.2"],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert make.returncode == 0, make.stderr[-3000:]

        # 1,280 samples in batches of 64: 20 steps an epoch. The rotation comes at step 20;
        # the next 30 steps read every shard again and write three checkpoints.
        cmd = [sys.executable, "jobs/pretrain.py", "--preset", "smoke", "--data",
               "s3://rotation/data", "--out", "s3://rotation/runs", "--name", "rotating",
               "--set", "data.augment=resize", "--set", "model.image_size=48",
               "--set", "model.hidden_size=128", "--set", "model.mlp_dim=512",
               "--set", "train.total_steps=50", "--set", "checkpoint.every=10",
               "--set", "checkpoint.keep=10", "--set", "probe.every=0"]
        job = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "run.log", "w"),
                               stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            def keys(prefix):
                return [o["Key"] for o in s3.list_objects_v2(
                    Bucket="rotation", Prefix=prefix).get("Contents", [])]

            deadline = time.monotonic() + 300
            while not any("step_00000020/train_state.json" in k for k in keys("runs/")):
                assert job.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint at step 20"
                time.sleep(0.2)
            # Rotate: the process now hands out the second key; the first is deleted.
            current.write_text(_expiring(second))
            rotator = boto3.session.Session(aws_access_key_id=second["AccessKeyId"],
                                            aws_secret_access_key=second["SecretAccessKey"],
                                            region_name="us-east-1")
            rotator.client("iam", endpoint_url=endpoint).delete_access_key(
                UserName="trainer", AccessKeyId=first["AccessKeyId"])
            old = boto3.session.Session(aws_access_key_id=first["AccessKeyId"],
                                        aws_secret_access_key=first["SecretAccessKey"],
                                        region_name="us-east-1").client(
                "s3", endpoint_url=endpoint)
            with pytest.raises(Exception, match="InvalidAccessKeyId"):
                old.list_objects_v2(Bucket="rotation")          # the first key is dead
            rotated_at = len(server_log.read_text().splitlines())
            assert job.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
        finally:
            stop_process_group(job)
        log = (tmp_path / "run.log").read_text()
        assert "finished at step 50" in log, log[-3000:]
        s3 = rotator.client("s3", endpoint_url=endpoint)
        steps = sorted({re.search(r"step_(\d+)/", k).group(1) for k in keys("runs/rotating/")
                        if "step_" in k})
        assert steps[-1] == "00000050" and len(steps) == 5, steps
        from pipeline.train import checkpoints

        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=second["AccessKeyId"],
                          AWS_SECRET_ACCESS_KEY=second["SecretAccessKey"])
        try:
            assert checkpoints.latest("s3://rotation/runs/rotating").endswith("step_00000050")
        finally:
            for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.pop(k, None)
        # After the rotation, checkpoint files were written by the long-lived Train worker.
        after = server_log.read_text().splitlines()[rotated_at:]
        puts = [ln for ln in after if '"PUT /rotation/runs/rotating/step_' in ln
                and '" 200' in ln]
        assert puts, "checkpoints were uploaded after the rotation"
    finally:
        stop_process_group(server)
