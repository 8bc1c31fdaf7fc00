"""Every infra file parses and validates where a validator exists; the local stack starts
three real services and stops them all."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# A secret-looking key given a literal value (not "${VAR}", "$$VAR", "...", "%s").
SECRET = re.compile(r"(?i)(password|secret|access_key_id|token)\w*\s*[:=]\s*[\"']?"
                    r"(?![$%.{])([A-Za-z0-9/+_-]{6,})")


def test_cluster_launcher_yaml_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}                       # drivers only on the head
    gpu_types = [n for n, t in cfg["available_node_types"].items()
                 if t["node_config"]["InstanceType"].startswith(("p", "g"))]
    assert gpu_types, "GPU workers"
    broken = {**cfg, "provider": {"type": "aws", "region": 5}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
            "template": template}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "config.yaml"])
def test_kuberay_manifests_validate(name):
    """Core objects against the Kubernetes schemas; KubeRay's CRDs have no schema in the
    validator, so their pod templates (most of the file) are validated as PodTemplates and
    the rest checked for the fields KubeRay requires."""
    import kubernetes_validate as kv

    version = kv.latest_version()
    doc = yaml.safe_load((INFRA / "k8s" / name).read_text())
    if doc["kind"] == "ConfigMap":
        kv.validate(doc, version, strict=True)
        return
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayJob":
        # It runs installed commands from the image's project folder, not a relative path
        # that depends on where Ray starts the entrypoint.
        import tomllib

        entry = doc["spec"]["entrypoint"]
        scripts = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"][
            "scripts"]
        assert "vit-pretrain" in entry and "vit-vtab" in entry
        assert {"vit-pretrain", "vit-vtab"} <= set(scripts)
        workdir = re.search(r"^WORKDIR (\S+)", (INFRA / "Dockerfile").read_text(), re.M)[1]
        assert f"cd {workdir} &&" in entry
        assert "python jobs/" not in entry and "python eval/" not in entry
    assert spec["rayVersion"] == "2.60.0"
    templates = [spec["headGroupSpec"]["template"]]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"]
        templates.append(group["template"])
    for template in templates:
        kv.validate(_pod_template(template), version, strict=True)
        for container in template["spec"]["containers"]:
            refs = {next(iter(e)) for e in container["envFrom"]}
            assert refs == {"configMapRef", "secretRef"}   # settings and secrets by reference
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for t in templates[1:]
            for c in t["spec"]["containers"]]
    assert all(gpus)


def test_mlflow_server_definition():
    doc = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    db, server = doc["services"]["db"], doc["services"]["mlflow"]
    assert db["image"].startswith("postgres")
    command = " ".join(server["command"])
    assert "--backend-store-uri \"postgresql://" in command            # database backend
    assert "--artifacts-destination" in command and "MLFLOW_ARTIFACTS" in command
    assert "--app-name basic-auth" in command                          # authentication on
    assert server["environment"]["MLFLOW_ADMIN_PASSWORD"].startswith("${")   # from the shell


def test_dockerfile_parses():
    lines, current = [], ""
    for raw in (INFRA / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            lines.append(current.strip())
            current = ""
    words = [ln.split()[0] for ln in lines]
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "CMD",
             "ENTRYPOINT", "EXPOSE", "LABEL", "SHELL", "VOLUME", "HEALTHCHECK"}
    assert words[0] in ("FROM", "ARG") and set(words) <= known, words
    assert any("torch==2.13.0" in ln and "download.pytorch.org" in ln or "TORCH_INDEX" in ln
               for ln in lines if ln.startswith("RUN"))
    for ln in lines:
        if ln.startswith("COPY"):
            for src in [w for w in ln.split()[1:-1] if not w.startswith("--")]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"


def test_shell_scripts_parse_and_no_secrets_in_infra():
    subprocess.run(["bash", "-n", str(INFRA / "submit.sh")], check=True)
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".sh", ".py", "") and \
                "__pycache__" not in path.parts:
            for line in path.read_text().splitlines():
                assert not SECRET.search(line) or "testing" in line, \
                    f"{path.name}: {line.strip()}"          # moto's dummy keys are fine
    assert SECRET.search("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI")      # the check can fail
    assert not SECRET.search("MLFLOW_ADMIN_PASSWORD: ${MLFLOW_ADMIN_PASSWORD:?set it}")


def _cmdlines() -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
    return out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_local_stack_starts_and_stops_cleanly(tmp_path):
    import boto3

    state_dir = tmp_path / "stack"
    script = [sys.executable, str(INFRA / "local_stack.py")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    up = subprocess.run(script + ["up", "--dir", str(state_dir), "--num-cpus", "2"], env=env,
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        exports = subprocess.run(script + ["env", "--dir", str(state_dir)], capture_output=True,
                                 text=True, check=True).stdout
        settings = dict(ln[len("export "):].split("=", 1) for ln in exports.splitlines())
        s3 = boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"],
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.put_object(Bucket="vit-local", Key="hello", Body=b"world")
        assert s3.get_object(Bucket="vit-local", Key="hello")["Body"].read() == b"world"
        with urllib.request.urlopen(settings["MLFLOW_TRACKING_URI"] + "/health", timeout=10) as r:
            assert r.status == 200
        # Jobs through its head: the demo's (tests/jobs/test_demo.py); here its job API
        # answers, behind its token.
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(settings["RAY_ADDRESS"] + "/api/jobs/", timeout=10)
        status = subprocess.run(script + ["status", "--dir", str(state_dir)],
                                capture_output=True, text=True)
        assert status.returncode == 0 and status.stdout.count("running") == 3
        state = json.loads((state_dir / "state.json").read_text())
        # The MLflow server runs no job runner: its huey consumers poll, idle, at half a core.
        server = psutil.Process(state["pids"]["mlflow"])
        assert not [c for p in server.children(recursive=True)
                    if "huey" in (c := " ".join(p.cmdline()))], "MLflow's job runner started"
    finally:
        down = subprocess.run(script + ["down", "--dir", str(state_dir)], capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    time.sleep(1)
    for pid in state["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    leftovers = [c for c in _cmdlines() if state["ray_tmp"] in c or
                 str(state_dir) in c]
    assert not leftovers, leftovers
    assert not (state_dir / "state.json").exists()


# infra/submit.sh runs against real heads, with and without authentication, in
# tests/infra/test_kuberay.py.
