"""The team MLflow server of infra/mlflow/compose.yaml, started as Compose starts it.

The `mlflow` service's entrypoint + command and its `environment:` go through Compose's own
interpolation (`interpolate`, below) with a user's shell settings, and run with `/bin/sh -c`
as the entrypoint says. Only what a local stand-in needs is substituted (`local_stand_in`,
each substitution named there); the basic-auth app, its ini written at start by the service's
shell, the proxied artifacts on S3 (moto's server, as MinIO would be reached) are the real
ones. Then: strangers are refused, and `vit-pretrain` logs to it with credentials from its
environment, which appear nowhere.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import S3_TEST_ENV, _wait_http, free_port, stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.mlflow, pytest.mark.s3]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "mlflow" / "compose.yaml"
BIN = Path(sys.executable).parent
# Generated-looking secrets (base64 alphabet, and a '%' that configparser would choke on
# if the password went into the auth ini).
ADMIN_PASSWORD = "vitAuthAdmin%Pw/+=Q9x7"
DB_PASSWORD = "vitAuthDbPw9f8e7d6c5b"
SECRETS = (ADMIN_PASSWORD, DB_PASSWORD)
SERVED_NAME = "mlflow.example.com:5000"   # a name clients use, listed by the operator


class InterpolationError(ValueError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one value (compose-spec, 12-interpolation.md): `$$` is a
    literal `$`; `$VAR` / `${VAR}` the value or ""; `${VAR:-d}` / `${VAR-d}` d when VAR is
    unset or empty / unset; `${VAR:?e}` / `${VAR?e}` an error e then; `${VAR:+r}` / `${VAR+r}`
    r when VAR is set and non-empty / set. The argument is interpolated too (nesting), only
    when used. Any other `$` is an invalid template, as in compose-go."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        rest = text[i + 1:]
        if rest.startswith("$"):
            out.append("$")
            i += 2
        elif rest.startswith("{"):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise InterpolationError(f"unclosed ${{ in {text!r}")
            out.append(_braced(text[i + 2:j - 1], env))
            i = j
        elif m := _NAME.match(rest):
            out.append(env.get(m.group(), ""))
            i += 1 + m.end()
        else:
            raise InterpolationError(f"invalid interpolation format in {text!r}")
    return "".join(out)


def _braced(body: str, env: dict[str, str]) -> str:
    m = _BRACED.fullmatch(body)
    if not m:
        raise InterpolationError(f"invalid interpolation format: ${{{body}}}")
    name, op, arg = m.groups()
    value = env.get(name)
    present = value is not None if op and not op.startswith(":") else bool(value)
    if op is None:
        return value or ""
    if op.endswith("-"):
        return value if present else interpolate(arg, env)
    if op.endswith("?"):
        if not present:
            raise InterpolationError(f"required variable {name} is missing a value: "
                                     f"{interpolate(arg, env)}")
        return value
    return interpolate(arg, env) if present else ""            # ":+" / "+"


def interpolate_tree(node, env: dict[str, str]):
    """Every string value of a parsed Compose file interpolated (keys are left as they are)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def test_interpolation_follows_compose():
    env = {"A": "a", "EMPTY": ""}
    assert interpolate("$$A ${A} $A ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${A:+r} ${EMPTY+r}",
                       env) == "$A a a d  d r r"
    assert interpolate("${UNSET:-${A:-x}}/${EMPTY:+no}", env) == "a/"
    for bad in ("${UNSET:?set UNSET}", "${EMPTY:?set it}", "${UNSET?x}", "$ {A}", "${A"):
        with pytest.raises(InterpolationError):
            interpolate(bad, env)
    assert interpolate("${EMPTY?x}", env) == ""


def compose_service(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The `mlflow` service as Compose would start it: argv (entrypoint + command) and the
    container's environment (its `environment:` mapping), interpolated with `env`."""
    service = interpolate_tree(yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"], env)
    argv = list(service["entrypoint"]) + list(service["command"])
    environment = service["environment"]
    if isinstance(environment, list):                     # the `- KEY=value` form
        environment = dict(item.split("=", 1) for item in environment)
    return argv, {k: "" if v is None else str(v) for k, v in environment.items()}


def local_stand_in(argv: list[str], env: dict[str, str], root: Path, port: int):
    """Substitute only what running outside the container needs; everything else stays."""
    script = argv[-1]
    # 1. The image's start-up `pip install ... &&`: the packages are in this virtualenv
    #    (what it must add: test_start_up_installs_what_the_image_lacks).
    script, n = re.subn(r"^pip install [^&]*&&\s*", "", script)
    assert n == 1, script
    # 2. PostgreSQL (the `db` service) -> one SQLite file, shared by the tracking store and
    #    the auth store as the one PostgreSQL database is (separate alembic version tables).
    #    In printf's format the password is a `%s`: `%.0s` still consumes its argument.
    db = f"sqlite:///{root}/mlflow.db"
    script, n = re.subn(r"postgresql://[^\s\"'\\]+",
                        lambda m: db + "%.0s" * m.group().count("%s"), script)
    assert n == 2, script
    # 3. The container's private /tmp (the auth ini holds what MLflow reads at start) -> ours.
    script = script.replace("/tmp/basic_auth.ini", str(root / "basic_auth.ini"))
    env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini")}
    # 4. --host 0.0.0.0 (every interface of the container) -> loopback; port 5000 -> free one.
    script, n = re.subn(r"--host 0\.0\.0\.0 --port 5000\b",
                        f"--host 127.0.0.1 --port {port}", script)
    assert n == 1, script
    # 5. The image's PATH (where `mlflow` is) -> this virtualenv's; HOME -> a scratch one.
    env = {**env, "PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root / "home")}
    return [*argv[:-1], script], env


def user_shell(s3_endpoint: str, bucket: str, port: int) -> dict[str, str]:
    """What the compose file's header tells the operator to export (MinIO form: the
    endpoint and keys of moto's S3 server; the host names clients use: a DNS name, and the
    address this test's clients use)."""
    return {"MLFLOW_DB_PASSWORD": DB_PASSWORD, "MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "MLFLOW_ARTIFACTS": f"s3://{bucket}/mlflow",
            "MLFLOW_ALLOWED_HOSTS": f"{SERVED_NAME},127.0.0.1:{port}",
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture(scope="module")
def auth_server(s3_server, tmp_path_factory):
    """-> (URI, root folder, S3 client, bucket) of the compose-started server."""
    import boto3

    root = tmp_path_factory.mktemp("mlflow-auth")
    (root / "home").mkdir()
    bucket = "mlflow-auth"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)
    port = free_port()
    argv, env = local_stand_in(*compose_service(user_shell(s3_server, bucket, port)), root,
                               port)
    proc = subprocess.Popen(argv, env=env, cwd=root, stdout=open(root / "server.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_http(f"{uri}/health", 180, proc)
        except (RuntimeError, TimeoutError) as err:
            raise AssertionError(f"{err}\n{(root / 'server.log').read_text()[-4000:]}") from None
        yield uri, root, s3, bucket
    finally:
        stop_process_group(proc)


def _get(uri: str, user: str | None = None, password: str | None = None,
         host: str | None = None) -> int:
    """HTTP status of an experiments search, optionally with basic auth and a Host header."""
    import http.client

    headers = {"Host": host} if host else {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    connection = http.client.HTTPConnection(uri.split("://", 1)[1], timeout=30)
    try:
        connection.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                           headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_start_up_installs_what_the_image_lacks():
    """The stand-in drops the start-up `pip install`, so check here what it must add: the
    image is MLflow alone (mlflow/mlflow docker/Dockerfile: `pip install mlflow==VERSION`),
    and the basic-auth app imports Flask-WTF, which only MLflow's `auth` extra brings."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    service = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    image_version = service["image"].rsplit(":v", 1)[1]
    assert metadata.version("mlflow") == image_version      # the stand-in runs that MLflow
    pip = re.match(r"pip install ([^&]*)&&", service["command"][-1])
    assert pip, service["command"]
    brought = set()
    for word in shlex.split(pip.group(1)):
        if word.startswith("-"):
            continue
        req = Requirement(word)
        brought.add(canonicalize_name(req.name))
        if req.name == "mlflow":
            assert req.specifier.contains(image_version), word   # never another MLflow
        for extra in req.extras:
            for dep in map(Requirement, metadata.requires(req.name) or []):
                if dep.marker and dep.marker.evaluate({"extra": extra}):
                    brought.add(canonicalize_name(dep.name))
    assert {"flask-wtf", "psycopg2-binary", "boto3"} <= brought, brought


def test_strangers_are_refused(auth_server):
    uri = auth_server[0]
    assert _get(uri) == 401
    assert _get(uri, "admin", ADMIN_PASSWORD[:-1]) == 401
    assert _get(uri, "intruder", ADMIN_PASSWORD) == 401
    assert _get(uri, "admin", ADMIN_PASSWORD) == 200
    # By name: the names the operator listed are served, others refused (MLflow's guard).
    assert _get(uri, "admin", ADMIN_PASSWORD, host=SERVED_NAME) == 200
    assert _get(uri, "admin", ADMIN_PASSWORD, host="elsewhere.example.com:5000") == 403


def test_refusals_say_which_variables_to_set(auth_server, monkeypatch):
    """What `pipeline.tracking.refusal` makes of the server's real answers."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = auth_server[0]
    lines = {}
    for case, user, password in (("none", None, None), ("wrong", "admin", "not-it-at-all")):
        for key, value in (("MLFLOW_TRACKING_USERNAME", user),
                           ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        with pytest.raises(Exception) as caught:
            MlflowClient(uri).search_experiments(max_results=1)
        lines[case] = tracking.refusal(caught.value, uri)
    assert lines["none"] == (f"MLflow server {uri} refused a request without credentials "
                             f"(HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                             f"MLFLOW_TRACKING_PASSWORD to an account of it")
    assert "refused the credentials of user 'admin' (HTTP 401)" in lines["wrong"]
    assert tracking.refusal(ConnectionError("down"), uri) is None      # an outage is not one


def _processes_under(path: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if path in cmdline:
                found.append(cmdline)
    return found


def _search(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {s[:6]}..." for s in SECRETS if s.encode() in data]
    return hits


def test_pretraining_logs_with_credentials_from_the_environment(auth_server, tmp_path,
                                                                monkeypatch):
    from mlflow.tracking import MlflowClient

    uri, root, s3, bucket = auth_server
    # Its own short temp dir: the local Ray this command starts keeps its session there
    # (socket paths must stay under 108 bytes).
    temp = Path(tempfile.mkdtemp(prefix="ma", dir="/tmp"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))}   # no S3 keys: proxied
    env.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "auth-test",
                "TMPDIR": str(temp), "HOME": str(tmp_path / "home"),
                "RAY_USAGE_STATS_ENABLED": "0"})
    credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}

    def pretrain(name: str, extra: dict) -> tuple[subprocess.CompletedProcess, float]:
        start = time.monotonic()
        out = subprocess.run(
            [str(BIN / "vit-pretrain"), "--preset", "smoke", "--name", name,
             "--out", str(tmp_path / "runs"), "--set", "train.total_steps=20",
             "--set", "probe.every=0"],
            env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        return out, time.monotonic() - start

    try:
        out, _ = pretrain("with-auth", credentials)
        output = out.stdout + out.stderr
        assert out.returncode == 0, output[-4000:]
        refused, seconds = pretrain("without-auth", {})
        wrong, _ = pretrain("wrong-password", {"MLFLOW_TRACKING_USERNAME": "admin",
                                               "MLFLOW_TRACKING_PASSWORD": "not-it"})
        deadline = time.monotonic() + 30  # the local Ray of each command goes with it
        while (left := _processes_under(str(temp))) and time.monotonic() < deadline:
            time.sleep(1)
        hits = [f"output: {s[:6]}..." for s in SECRETS if s in output + refused.stdout
                + refused.stderr]
        sessions = [p.name for p in temp.glob("ray/session_*")    # one per Ray, searched
                    if not p.is_symlink() and any((p / "logs").glob("raylet*"))]
        hits += _search(temp)              # Ray's session logs and spilled objects
        hits += _search(root)              # the server's log, database, auth ini
        hits += _search(tmp_path)          # the run folders, HOME
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, left
    assert len(sessions) == 1, sessions      # the refused command started no Ray

    # Without credentials: one line that names the variables, before Ray starts.
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert lines[-1] == (f"error: MLflow server {uri} refused a request without credentials "
                         f"(HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                         f"MLFLOW_TRACKING_PASSWORD to an account of it"), lines[-5:]
    assert "Traceback" not in refused.stdout + refused.stderr
    assert "Started a local Ray instance" not in refused.stdout + refused.stderr
    assert not (tmp_path / "runs" / "without-auth").exists()
    assert seconds < 120, seconds
    # Credentials the server does not take: the same, naming the user.
    assert wrong.returncode == 2, wrong.stdout[-2000:] + wrong.stderr[-2000:]
    assert wrong.stderr.strip().splitlines()[-1] == (
        f"error: MLflow server {uri} refused the credentials of user 'admin' (HTTP 401): "
        f"check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), wrong.stderr[-2000:]
    assert "Started a local Ray instance" not in wrong.stdout + wrong.stderr
    # vit-vtab too, on the checkpoint just trained: refused before Ray starts a trial.
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    write_grating_task(tmp_path / "vtab", BY_NAME["eurosat"], seed=0)
    vtab = subprocess.run(
        [str(BIN / "vit-vtab"), "--checkpoint", str(tmp_path / "runs" / "with-auth"),
         "--data", str(tmp_path / "vtab"), "--tasks", "eurosat", "--out",
         str(tmp_path / "vtab-runs")], env={**env, "TMPDIR": "/tmp"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert vtab.returncode == 2, vtab.stdout[-2000:] + vtab.stderr[-2000:]
    assert vtab.stderr.strip().splitlines()[-1] == lines[-1]
    assert "Traceback" not in vtab.stdout + vtab.stderr
    assert "Started a local Ray instance" not in vtab.stdout + vtab.stderr

    # With them: the run is on the server, finished, with its metrics and artifacts (those
    # on S3, behind the server: the command had no S3 keys).
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("auth-test").experiment_id])
    assert [r.info.run_name for r in runs] == ["with-auth"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/loss"] > 0
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 1
    assert run.data.params["train.total_steps"] == "20"
    fields = json.dumps([run.data.params, run.data.tags])
    hits += [f"params/tags: {s[:6]}..." for s in SECRETS if s in fields]
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "art")))
    assert (artifacts / "config.json").is_file(), list(artifacts.rglob("*"))
    hits += _search(artifacts)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("mlflow/") and k.endswith("config.json") for k in keys), keys
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        hits += [f"s3://{bucket}/{key}: {s[:6]}..." for s in SECRETS if s.encode() in body]
    assert not hits, "\n".join(hits)
