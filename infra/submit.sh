#!/usr/bin/env bash
# Submit a pipeline job to a Ray cluster (RAY_ADDRESS: the dashboard, e.g. after
# `ray dashboard infra/aws/cluster.yaml` or a kubectl port-forward), with this checkout as
# the working dir and the non-secret settings of this shell forwarded into the job:
#
#   infra/submit.sh pretrain --preset vit_b16_i21k --set data.uri=s3://bucket/in21k ...
#   infra/submit.sh vtab --checkpoint s3://bucket/runs/vit-b16-i21k --data s3://bucket/vtab-1k
#
# Forwarded when set: MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, AWS_REGION, VTAB_DATA.
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
keys = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION", "VTAB_DATA")
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys if os.environ.get(k)}}))
PY
)
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray job submit --working-dir . --runtime-env-json "$env_json" -- python "$script" "$@"
