#!/usr/bin/env bash
# Submit a pipeline job to a Ray cluster (RAY_ADDRESS: its dashboard, e.g. after
# `ray dashboard infra/aws/cluster.yaml` or a kubectl port-forward; default
# http://127.0.0.1:8265), with this checkout as the working dir and the non-secret settings
# of this shell forwarded into the job:
#
#   infra/submit.sh pretrain --preset vit_b16_i21k --set data.uri=s3://bucket/in21k ...
#   infra/submit.sh vtab --checkpoint s3://bucket/runs/vit-b16-i21k --data s3://bucket/vtab-1k
#
# Forwarded when set: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, AWS_ENDPOINT_URL,
# AWS_REGION, VTAB_DATA; and VIT_GIT_COMMIT, this checkout's commit (the uploaded working dir
# has no .git), which the MLflow runs record as mlflow.source.git.commit.
# Secrets (AWS keys, MLflow passwords) are not forwarded: a job's runtime env is visible in
# the Ray dashboard. Give them to the nodes instead (instance role, Kubernetes Secret).
#
# The Ray token. The clusters of infra/ turn Ray's token authentication on: without the
# token, the dashboard and job API answer 401. It is taken, in Ray's own order, from
# RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, or fetched from where the
# cluster keeps it when VIT_RAY_TOKEN_SECRET says where:
#   VIT_RAY_TOKEN_SECRET=k8s:vit-pipeline[/namespace]  KubeRay's Secret (key auth_token),
#                                                      named after the RayCluster
#   VIT_RAY_TOKEN_SECRET=aws:vit-pipeline/ray-token    AWS Secrets Manager (aws/cluster.yaml)
# A fetched token lives only in the environment of `ray job submit`. A head without
# authentication (RAY_AUTH_MODE=disabled) needs none.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: infra/submit.sh pretrain|vtab [args...]}"
shift
case "$kind" in
  pretrain) script=jobs/pretrain.py ;;
  vtab) script=eval/vtab.py ;;
  *) echo "error: unknown job '$kind'; use pretrain or vtab" >&2; exit 2 ;;
esac
# The placeholders of the presets and cluster files, refused before the cluster is asked.
for arg in "$@" "${VTAB_DATA:-}"; do
  case "$arg" in
    *CHANGE-ME*|*your-bucket*)
      echo "error: '$arg' still holds a placeholder: replace it with your own bucket" >&2
      exit 2 ;;
  esac
done
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
case "$address" in http://*|https://*) ;; *) address="http://$address" ;; esac

if [ -n "${VIT_RAY_TOKEN_SECRET:-}" ]; then
  case "$VIT_RAY_TOKEN_SECRET" in
    k8s:*)
      ref="${VIT_RAY_TOKEN_SECRET#k8s:}"; name="${ref%%/*}"; ns=""
      [ "$ref" != "$name" ] && ns="${ref#*/}"
      fetch="kubectl get secret $name ${ns:+-n $ns }-o jsonpath={.data.auth_token}"
      encoded=$($fetch) && RAY_AUTH_TOKEN=$(printf '%s' "$encoded" | base64 -d) \
        || { echo "error: could not read the Ray token with '$fetch'" >&2; exit 2; } ;;
    aws:*)
      fetch="aws secretsmanager get-secret-value --secret-id ${VIT_RAY_TOKEN_SECRET#aws:} --query SecretString --output text"
      RAY_AUTH_TOKEN=$($fetch) \
        || { echo "error: could not read the Ray token with '$fetch'" >&2; exit 2; } ;;
    *)
      echo "error: VIT_RAY_TOKEN_SECRET=$VIT_RAY_TOKEN_SECRET: use k8s:<secret>[/<namespace>] or aws:<secret-id>" >&2
      exit 2 ;;
  esac
  [ -n "$RAY_AUTH_TOKEN" ] || { echo "error: '$fetch' gave an empty Ray token" >&2; exit 2; }
  export RAY_AUTH_TOKEN
fi

# Ask the head whether it wants a token (and whether ours is its): one line when not, not
# `ray job submit`'s traceback.
RAY_AUTH_MODE=$(python3 - "$address" <<'PY'
import os, sys, urllib.error, urllib.request

address = sys.argv[1]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def token():
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        return open(path).read().strip() or None
    except OSError:
        return None


def status(tok):
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    request = urllib.request.Request(address.rstrip("/") + "/api/version", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15):
            return 200
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        fail(f"cannot reach the Ray dashboard at {address} "
             f"({getattr(err, 'reason', err)}): start the port-forward "
             f"(`ray dashboard infra/aws/cluster.yaml`, or `kubectl port-forward "
             f"svc/vit-pipeline-head-svc 8265:8265`) or set RAY_ADDRESS")


if status(None) == 200:
    print("disabled")          # a head without authentication
    sys.exit(0)
tok = token()
fetch = ("VIT_RAY_TOKEN_SECRET=k8s:<RayCluster name> (KubeRay) or "
         "VIT_RAY_TOKEN_SECRET=aws:vit-pipeline/ray-token (infra/aws/cluster.yaml)")
if tok is None:
    fail(f"the Ray cluster at {address} requires its token (token authentication) and none "
         f"is set: rerun with {fetch}, or put the token in RAY_AUTH_TOKEN")
code = status(tok)
if code in (401, 403):
    fail(f"the Ray cluster at {address} refused the token (HTTP {code}): it is not this "
         f"cluster's; fetch it with {fetch}")
if code != 200:
    fail(f"the Ray dashboard at {address} answered HTTP {code}")
print("token")
PY
)
export RAY_AUTH_MODE

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
exec ray job submit --address "$address" --working-dir . --runtime-env-json "$env_json" \
  -- python "$script" "$@"
