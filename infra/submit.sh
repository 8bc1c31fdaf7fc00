#!/usr/bin/env bash
# Submit a pipeline job to a Ray cluster (RAY_ADDRESS: the dashboard, e.g. after
# `ray dashboard infra/aws/cluster.yaml` or a kubectl port-forward), with this checkout as
# the working dir and the non-secret settings of this shell forwarded into the job:
#
#   infra/submit.sh pretrain --preset vit_b16_i21k --set data.uri=s3://bucket/in21k ...
#   infra/submit.sh vtab --checkpoint s3://bucket/runs/vit-b16-i21k --data s3://bucket/vtab-1k
#
# Forwarded when set: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, AWS_ENDPOINT_URL,
# AWS_REGION, VTAB_DATA; and VIT_GIT_COMMIT, this checkout's commit (the uploaded working dir
# has no .git), which the MLflow runs record as mlflow.source.git.commit.
# Secrets (AWS keys, MLflow passwords) are not forwarded: a job's runtime env is visible in
# the Ray dashboard. Give them to the nodes instead (instance role, Kubernetes Secret).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: infra/submit.sh pretrain|vtab [args...]}"
shift
case "$kind" in
  pretrain) script=jobs/pretrain.py ;;
  vtab) script=eval/vtab.py ;;
  *) echo "error: unknown job '$kind'; use pretrain or vtab" >&2; exit 2 ;;
esac
env_json=$(python3 - <<'PY'
import json, os
import subprocess
keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_ENDPOINT_URL", "AWS_REGION",
        "VTAB_DATA")
env = {k: os.environ[k] for k in keys if os.environ.get(k)}
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
commit = git("rev-parse", "HEAD")
if commit:
    env["VIT_GIT_COMMIT"] = commit + ("-dirty" if git("status", "--porcelain") else "")
print(json.dumps({"env_vars": env}))
PY
)
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray job submit --working-dir . --runtime-env-json "$env_json" -- python "$script" "$@"
