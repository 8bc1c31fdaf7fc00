"""The KubeRay manifests run the way KubeRay runs them (tests/infra/kuberay.py transcribes the
operator): the RayJob's cluster, head and worker, started from the commands and environment
the operator gives their containers (ConfigMap, our Secret, the Ray token of
`authOptions`); the RayJob's entrypoint through the submitter's `bash -ce` script, in the
submitter's environment (no ConfigMap, no Secret); and `infra/submit.sh` against that
head and against one without authentication.

What one machine forces, and nothing else, is changed: the ports (pods have a network
namespace each) and Ray's temp dir are added to rayStartParams, the pods' resource limits
are scaled to this machine (KubeRay derives --num-cpus, --memory and --num-gpus from them),
`your-bucket` is filled in as a user would, and the image's project folder is this
checkout. The pipeline commands on the head are stand-ins that parse their arguments with
the real parsers and record them: this is about how the commands reach the head."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import _wait_http, free_port, stop_process_group
from tests.infra import kuberay

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
BIN = Path(sys.executable).parent
WORKDIR = re.search(r"^WORKDIR (\S+)", (ROOT / "infra" / "Dockerfile").read_text(), re.M)[1]
CLUSTER = "vit-b16-i21k-then-vtab-x7k2p"      # KubeRay names a RayJob's cluster <job>-<id>

STANDIN = f'''#!{sys.executable}
"""A stand-in for the installed command: the real argument parser, then a record."""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
name = os.path.basename(sys.argv[0])
if name == "vit-pretrain":
    from jobs.pretrain import parse_args, resolve
    resolve(parse_args(sys.argv[1:]))
else:
    from eval.vtab import parse_args
    parse_args(sys.argv[1:])
with open(os.environ["VIT_STANDIN_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": name, "argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
'''


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def filled_in(text: str) -> str:
    return text.replace("your-bucket", "test-bucket")


def start(cmd: str, env: dict, log: Path) -> subprocess.Popen:
    """A Ray container: `/bin/bash -c -- ARGS` (utils.GetContainerCommand), its own group."""
    return subprocess.Popen(["/bin/bash", "-c", "--", cmd], env=env, cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def node_count(dashboard: str, token: str) -> int:
    request = urllib.request.Request(f"{dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        summary = json.loads(r.read())["data"]["summary"]
    return sum(1 for n in summary if n["raylet"]["state"] == "ALIVE")


def wait_for(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(Path(p).read_text(errors="replace")[-1500:] for p in logs)
            raise TimeoutError(f"no {what} after {timeout} s\n{tails}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The RayJob's RayCluster: a head pod and one worker pod, as KubeRay starts them."""
    tmp = tmp_path_factory.mktemp("kuberay")
    short = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))   # Ray's socket paths < 108 B
    job = load("rayjob.yaml")
    spec = job["spec"]["rayClusterSpec"]
    token = secrets.token_hex(32)
    configmap = {k: filled_in(v) for k, v in load("config.yaml")["data"].items()}
    configmap["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    configmap["VTAB_DATA"] = str(tmp / "vtab-1k")
    secrets_ = {"vit-pipeline-credentials": {"AWS_ACCESS_KEY_ID": "AKIATESTKEY",
                                             "AWS_SECRET_ACCESS_KEY": "not-for-logs"},
                CLUSTER: {"auth_token": token}}            # what KubeRay generates
    bindir = tmp / "bin"
    bindir.mkdir()
    for name in ("vit-pretrain", "vit-vtab"):
        (bindir / name).write_text(STANDIN)
        (bindir / name).chmod(0o755)
    record = tmp / "commands.jsonl"
    base = {"PATH": f"{bindir}:{BIN}:/usr/bin:/bin", "HOME": str(tmp),
            "RAY_USAGE_STATS_ENABLED": "0", "VIT_STANDIN_LOG": str(record),
            "PYTHONPATH": str(ROOT),
            # Not the pods' setting: the test's stop of a pod without the 30 s node drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    dash, gcs = free_port(), free_port()
    ports = {"port": gcs, "dashboard-port": dash, "metrics-export-port": free_port(),
             "dashboard-agent-listen-port": free_port(),
             "dashboard-agent-grpc-port": free_port(), "ray-client-server-port": free_port(),
             "runtime-env-agent-port": free_port()}
    head_params = {**spec["headGroupSpec"]["rayStartParams"], **ports,
                   "temp-dir": str(short), "num-cpus": "2"}
    group = spec["workerGroupSpecs"][0]
    worker_params = {**group["rayStartParams"],
                     **{k: free_port() for k in ports if k not in ("port", "dashboard-port",
                                                                   "ray-client-server-port")}}
    env = {**base, **kuberay.container_env(spec["headGroupSpec"]["template"], {
        "vit-pipeline-config": configmap}, secrets_, CLUSTER, spec.get("authOptions"))}
    worker_env = {**base, **kuberay.container_env(group["template"], {
        "vit-pipeline-config": configmap}, secrets_, CLUSTER, spec.get("authOptions"))}
    head_cmd = kuberay.ray_start_command("head", head_params, {"cpu": "2", "memory": "4Gi"})
    worker_cmd = kuberay.ray_start_command("worker", worker_params,
                                           {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"},
                                           head_address=f"127.0.0.1:{gcs}")
    procs = []
    try:
        procs.append(start(head_cmd, env, tmp / "head.log"))
        address = f"http://127.0.0.1:{dash}"
        _wait_http(f"{address}/api/gcs_healthz", 180, procs[0])
        procs.append(start(worker_cmd, worker_env, tmp / "worker.log"))
        wait_for(lambda: node_count(address, token) == 2, 120, "worker pod joined",
                 [tmp / "head.log", tmp / "worker.log"])
        yield {"address": address, "token": token, "tmp": tmp, "record": record,
               "configmap": configmap, "secrets": secrets_, "job": job, "gcs": gcs,
               "head_cmd": head_cmd, "worker_cmd": worker_cmd, "env": env}
    finally:
        for proc in reversed(procs):
            stop_process_group(proc, timeout=5)
        shutil.rmtree(short, ignore_errors=True)


def test_the_rayclusters_pods_are_the_rayjobs_pods():
    """raycluster.yaml and rayjob.yaml's cluster give the same commands and environment
    (so the cluster started below exercises both)."""
    cluster_spec, job_spec = load("raycluster.yaml")["spec"], load("rayjob.yaml")["spec"][
        "rayClusterSpec"]
    for key in ("rayVersion", "enableInTreeAutoscaling", "authOptions"):
        assert cluster_spec[key] == job_spec[key], key
    assert cluster_spec["authOptions"] == {"mode": "token"}
    def pods(spec):   # what KubeRay turns into the command and environment of each pod
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        return [(g["rayStartParams"], [{k: c.get(k) for k in ("image", "envFrom", "env",
                                                               "resources")}
                                       for c in g["template"]["spec"]["containers"]])
                for g in groups]

    assert pods(cluster_spec) == pods(job_spec)
    # Our Secret must not be named after a cluster: KubeRay's token Secret takes that name.
    refs = {s["secretRef"]["name"] for t in [cluster_spec["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster_spec["workerGroupSpecs"]]
        for s in t["spec"]["containers"][0]["envFrom"] if "secretRef" in s}
    assert refs == {"vit-pipeline-credentials"}
    assert load("raycluster.yaml")["metadata"]["name"] not in refs


def test_the_pods_start_and_join_only_with_the_token(cluster, tmp_path):
    assert "--head" in cluster["head_cmd"] and "--block" in cluster["head_cmd"]
    assert node_count(cluster["address"], cluster["token"]) == 2
    # The dashboard and job API refuse a client without the token; health stays open
    # (KubeRay's probes and the submitter's wait loop use it).
    for path in ("/api/version", "/api/jobs/", "/nodes?view=summary"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(cluster["address"] + path, timeout=10)
        assert refused.value.code == 401, path
    urllib.request.urlopen(cluster["address"] + "/api/gcs_healthz", timeout=10)
    # A node with another token is not let in.
    stranger = {**cluster["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    out = subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{cluster['gcs']}",
                          "--num-cpus=1", f"--temp-dir={tmp_path}"], env=stranger,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert node_count(cluster["address"], cluster["token"]) == 2


def test_an_unauthenticated_ray_job_submit_is_refused(cluster, tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    marker = tmp_path / "ran"
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["address"],
                          "--", "touch", str(marker)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "401" in out.stdout + out.stderr or "uthenticat" in out.stdout + out.stderr
    time.sleep(2)
    assert not marker.exists()


def test_the_rayjob_entrypoint_through_kuberays_submitter(cluster, tmp_path):
    entrypoint = cluster["job"]["spec"]["entrypoint"]
    assert entrypoint.count(f"cd {WORKDIR} ") == 1
    entrypoint = filled_in(entrypoint).replace(f"cd {WORKDIR} ", f"cd {ROOT} ")
    job_id = "rayjob-" + secrets.token_hex(4)
    script = kuberay.submitter_script(entrypoint, cluster["address"].removeprefix("http://"),
                                      job_id)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
           **kuberay.submitter_env(cluster["address"], job_id, CLUSTER, cluster["secrets"],
                                   cluster["job"]["spec"]["rayClusterSpec"]["authOptions"])}
    assert "VTAB_DATA" not in env
    out = subprocess.run(["/bin/bash", "-ce", "--", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in cluster["record"].read_text().splitlines()]
    assert [r["cmd"] for r in records] == ["vit-pretrain", "vit-vtab"], out.stdout[-3000:]
    pretrain, vtab = records
    assert pretrain["cwd"] == vtab["cwd"] == str(ROOT)
    # $VTAB_DATA expanded by the job's shell on the head, from the ConfigMap.
    data = vtab["argv"][vtab["argv"].index("--data") + 1]
    assert data == cluster["configmap"]["VTAB_DATA"]
    assert pretrain["argv"][pretrain["argv"].index("--out") + 1] == "s3://test-bucket/runs"
    # The submitter follows the job to its end and the job succeeded.
    client_env = {**env, "RAY_AUTH_MODE": "token"}
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address",
                             cluster["address"], job_id], env=client_env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()


def _submit(env: dict, *args: str, timeout: float = 300):
    return subprocess.run(["bash", str(ROOT / "infra" / "submit.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _client_env(tmp_path: Path, address: str, **extra) -> dict:
    return {"PATH": f"{tmp_path}/bin:{BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": address, **extra}


def test_submit_sh_against_the_authenticated_head(cluster, tmp_path):
    address = cluster["address"]
    # No token anywhere: one line that says how to fetch it, before `ray job submit`.
    out = _submit(_client_env(tmp_path, address), "pretrain", "--preset", "smoke",
                  "--show-config")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "requires its token" in lines[0], out.stderr
    assert "VIT_RAY_TOKEN_SECRET=k8s:" in lines[0] and "aws:" in lines[0]
    # Another cluster's token: refused, one line.
    out = _submit(_client_env(tmp_path, address, RAY_AUTH_TOKEN=secrets.token_hex(32)),
                  "pretrain", "--preset", "smoke", "--show-config")
    assert out.returncode == 2 and "refused the token" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # The token from where KubeRay keeps it: `kubectl` reads the cluster's Secret (a
    # stand-in that answers only the exact query KubeRay's Secret needs).
    (tmp_path / "bin").mkdir()
    encoded = base64.b64encode(cluster["token"].encode()).decode()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(f'''#!/bin/bash
[ "$*" = "get secret {CLUSTER} -n team -o jsonpath={{.data.auth_token}}" ] || {{
  echo "Error from server (NotFound): secrets \\"$3\\" not found" >&2; exit 1; }}
printf %s {encoded}
''')
    kubectl.chmod(0o755)
    env = _client_env(tmp_path, address, VIT_RAY_TOKEN_SECRET=f"k8s:{CLUSTER}/team",
                      MLFLOW_TRACKING_URI="http://mlflow.team:5000",
                      MLFLOW_TRACKING_PASSWORD="hunter2", AWS_SECRET_ACCESS_KEY="not-for-jobs",
                      AWS_REGION="us-west-2")
    out = _submit(env, "pretrain", "--preset", "smoke", "--show-config")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"run_name"' in out.stdout or '"run"' in out.stdout   # the job's own output
    assert cluster["token"] not in out.stdout + out.stderr
    # What the job carried: the settings and the commit, never a credential or the token.
    request = urllib.request.Request(f"{address}/api/jobs/", headers={
        "Authorization": f"Bearer {cluster['token']}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        jobs = json.loads(r.read())
    ours = [j for j in jobs if "jobs/pretrain.py --preset smoke --show-config" in
            j["entrypoint"]]
    assert ours and ours[-1]["status"] == "SUCCEEDED"
    carried = ours[-1]["runtime_env"]["env_vars"]
    assert carried["MLFLOW_TRACKING_URI"] == "http://mlflow.team:5000"
    assert carried["AWS_REGION"] == "us-west-2"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert carried["VIT_GIT_COMMIT"].startswith(head)
    everything = json.dumps(ours[-1])
    for secret in ("hunter2", "not-for-jobs", cluster["token"]):
        assert secret not in everything
    # A wrong Secret name: kubectl's failure becomes one line.
    env["VIT_RAY_TOKEN_SECRET"] = "k8s:vit-pipeline"
    out = _submit(env, "pretrain", "--preset", "smoke", "--show-config")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: could not read the Ray token")


def test_submit_sh_refuses_placeholders_before_asking_the_cluster(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    out = _submit(_client_env(tmp_path, closed), "pretrain", "--preset", "smoke",
                  "--set", "data.uri=s3://your-bucket/in21k", timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: 'data.uri=s3://your-bucket/in21k' still holds a "
                                  "placeholder: replace it with your own bucket")
    out = _submit(_client_env(tmp_path, closed), "vtab", "--checkpoint", "s3://b/runs/x",
                  timeout=60)
    assert out.returncode == 2 and "cannot reach the Ray dashboard at " + closed in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_submit_sh_against_a_head_without_authentication(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="na", dir="/tmp"))
    dash = free_port()
    env = {**_client_env(tmp_path, f"http://127.0.0.1:{dash}"), "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=1",
         f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--temp-dir={short}"], env=env, stdout=open(tmp_path / "head.log", "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 180, head)
        client = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        deadline = time.monotonic() + 120
        while True:   # the job agent registers a little after the dashboard answers
            out = _submit(client, "pretrain", "--preset", "smoke", "--show-config")
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            assert "No available agent" in out.stdout + out.stderr, out.stderr[-2000:]
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    finally:
        stop_process_group(head)
        shutil.rmtree(short, ignore_errors=True)
