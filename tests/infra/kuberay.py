"""What KubeRay makes of our manifests, transcribed from its operator (ray-project/kuberay,
ray-operator/controllers/ray, v1.7.0-rc.0+5, commit feeaf72): the Ray containers' commands
and environment, and the RayJob submitter's script. The tests run these on this machine,
so that a manifest is exercised the way the operator would run it, not only validated."""

from __future__ import annotations

import json
import re

DEFAULT_METRICS_PORT = 8080
DEFAULT_DASHBOARD_AGENT_LISTEN_PORT = 52365
# common/pod.go, convertParamMap: flags whose "true"/"false" value is passed explicitly.
EXPLICIT_BOOLEANS = ("log-color", "include-dashboard", "include-log-monitor")


def _quantity(value: str) -> int:
    """A Kubernetes quantity as an integer ("8", "500m" -> 1 rounded up, "32Gi")."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    number, unit = float(m[1]), m[2]
    if unit == "m":
        return -(-int(number) // 1000)
    return int(number * units.get(unit, 1))


def ray_start_command(node_type: str, params: dict[str, str], limits: dict[str, str],
                      head_address: str = "") -> str:
    """common/pod.go: setMissingRayStartParams + generateRayStartCommand + BuildPod's
    `ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start ...` (the container runs it
    with `/bin/bash -c --`)."""
    params = {k: str(v) for k, v in params.items()}
    if node_type == "worker":
        params.setdefault("address", head_address)
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(DEFAULT_METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
    if "num-cpus" not in params and limits.get("cpu"):
        params["num-cpus"] = str(_quantity(limits["cpu"]))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(_quantity(limits["memory"]))
    if "num-gpus" not in params and limits.get("nvidia.com/gpu"):
        params["num-gpus"] = str(_quantity(limits["nvidia.com/gpu"]))
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in EXPLICIT_BOOLEANS:
            if value.lower() == "true":
                flags.append(f" --{key} ")
        else:
            flags.append(f" --{key}={value} ")
    start = ("ray start --head" if node_type == "head" else "ray start") + " " + "".join(flags)
    return "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; " + start


def container_env(template: dict, configmaps: dict, secrets: dict, cluster: str,
                  auth: dict | None) -> dict[str, str]:
    """A Ray container's environment: `envFrom` (ConfigMaps, Secrets), then `env`, then
    what SetContainerTokenAuthEnvVars adds with `authOptions.mode: token` (RAY_AUTH_MODE,
    RAY_AUTH_TOKEN from the Secret named after the cluster, or `authOptions.secretName`)."""
    container = template["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "")
    if auth and auth.get("mode") == "token":
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("RAY_AUTH_TOKEN",
                       secrets[auth.get("secretName") or cluster]["auth_token"])
    return env


def submitter_script(entrypoint: str, dashboard: str, job_id: str,
                     metadata: dict | None = None) -> str:
    """common/job.go BuildJobSubmitCommand (K8sJobMode), joined with spaces as
    configureSubmitterContainer does; the container runs it with `/bin/bash -ce --`."""
    address = dashboard if dashboard.startswith("http://") else "http://" + dashboard
    health = (f"python -c \"import urllib.request; r=urllib.request.urlopen("
              f"'{address}/api/gcs_healthz', timeout=10); "
              f"exit(0 if b'success' in r.read() else 1)\"")
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
           json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."),
           ";", "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null",
            "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if metadata:
        cmd += ["--metadata-json", json.dumps(json.dumps(metadata))]
    cmd += ["--submission-id", job_id, "--", entrypoint.strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def submitter_env(dashboard: str, job_id: str, cluster: str, secrets: dict,
                  auth: dict | None) -> dict[str, str]:
    """The submitter container's own variables (configureSubmitterContainer): no ConfigMap,
    no Secret of ours, only these (and the image's)."""
    env = {"PYTHONUNBUFFERED": "1", "RAY_DASHBOARD_ADDRESS": dashboard,
           "RAY_JOB_SUBMISSION_ID": job_id}
    if auth and auth.get("mode") == "token":
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = secrets[auth.get("secretName") or cluster]["auth_token"]
    return env
