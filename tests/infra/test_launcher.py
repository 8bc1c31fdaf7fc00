"""infra/aws/cluster.yaml run the way Ray's cluster launcher runs it.

- Every node type: the docker config Ray merges for it and the `docker run` command Ray builds
  from that (Ray's own functions), checked against the devices that instance has and, where
  the Docker CLI is installed, parsed by Docker's own CLI.
- The boot of a node through Ray's own code: `ray up`'s get_or_create_head_node for the head,
  the v2 autoscaler's RayInstaller for a worker, both driving NodeUpdater and
  DockerCommandRunner / SSHCommandRunner over stand-in `ssh`, `docker` and `aws`
  executables. A host is a folder of this machine, its container another; each command runs
  in bash there, with the variables the launcher gives (RAY_HEAD_IP, ...) expanded on the
  node. `ray start` starts a real head and a real worker that joins it.

What one machine forces, and nothing else, is changed: the Ray ports (each node of a real
cluster has its own address) and a short --temp-dir per node; `ray stop` is scoped to its
own container (the real one stops every Ray process of the user on the machine, other
sessions' included); `ray up`'s copy of the bootstrap config to the head (rsync and chown to
the SSH user on a remote host) is replaced by the test writing that file into the head's
container; the cloud parts (EC2, Secrets Manager, the instance role) are the stand-ins."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray's launcher code is not installed")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "aws" / "cluster.yaml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
BIN = Path(sys.executable).parent
EFA_TYPES = ("efa", "efa-only")
ENV_FILE = "~/.vit-pipeline.env"
CREATE_SECRET = ('aws secretsmanager create-secret --name vit-pipeline/ray-token '
                 '--secret-string "$(openssl rand -hex 32)"')


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


NODE_TYPES = sorted(cluster_config()["available_node_types"])


# --- What Ray makes of the file -----------------------------------------------------------

def docker_config(config: dict, node_type: str) -> dict:
    """The docker block a node of this type is started with. The head: the top-level block
    alone (commands.py get_or_create_head_node passes config["docker"]). A worker: the v2
    autoscaler's AutoscalingConfig.get_docker_config (`ray up`'s default since Ray 2.50),
    checked against v1's autoscaler.py _get_node_specific_docker_config; both merge the
    type's own block over the top-level one with dict.update."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    if node_type == config["head_node_type"]:
        return config["docker"]
    merged = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True) \
        .get_docker_config(node_type)
    v1 = {**config["docker"], **config["available_node_types"][node_type].get("docker", {})}
    assert merged == v1
    return merged


def docker_run_command(config: dict, node_type: str, home: str = "/home/ray") -> str:
    """The `docker run` of DockerCommandRunner.run_init: run_options + head_/worker_run_options
    (a --shm-size among them, so _auto_configure_shm adds none; _configure_runtime adds
    --runtime=nvidia on hosts with NVIDIA's runtime, no --device), through docker_start_cmds."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = docker_config(config, node_type)
    role = "head" if node_type == config["head_node_type"] else "worker"
    options = docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
    assert any("--shm-size" in o for o in options)
    return docker_start_cmds(config["auth"]["ssh_user"], docker["image"], {},
                             docker["container_name"], options, config["cluster_name"], home,
                             "docker")


def run_flags(command: str) -> dict[str, list[str]]:
    """-e / --device / --env-file values of a docker run command line."""
    words, out = shlex.split(command), {"-e": [], "--device": [], "--env-file": []}
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if name in ("--env", "-e"):
            name = "-e"
        if name in out:
            out[name].append(value if eq else words[i + 1])
    return out


def efa_interfaces(node_config: dict) -> int:
    return sum(ni.get("InterfaceType") in EFA_TYPES
               for ni in node_config.get("NetworkInterfaces", []))


def host_devices(node_config: dict) -> set[str]:
    """The device paths under /dev/infiniband on an instance with this node_config: the EFA
    kernel driver (in the Deep Learning AMI) makes one uverbsN per attached EFA interface
    (AWS, "Get started with EFA and NCCL"), nothing without one. Docker refuses a --device
    path the host lacks ("error gathering device information")."""
    n = efa_interfaces(node_config)
    return {"/dev/infiniband", *(f"/dev/infiniband/uverbs{i}" for i in range(n))} if n else set()


def parse_env_file(text: str) -> dict[str, str]:
    """Docker's --env-file reader (docker/cli opts/envfile.go, pkg/kvfile/kvfile.go in newer
    trees; Docker 28 here): lines split on \\n (bufio.ScanLines drops one trailing \\r), a
    BOM dropped from the first, leading whitespace of a line dropped, empty lines and lines
    starting with # skipped, KEY=value split at the first "=", the value taken as is (quotes,
    trailing spaces and all), a key with a space or tab refused. A line without "=" copies
    the client's variable of that name; none is written here, so it is refused."""
    out = {}
    for n, raw in enumerate(text.split("\n")):
        line = raw[:-1] if raw.endswith("\r") else raw
        line = (line.removeprefix("\ufeff") if n == 0 else line).lstrip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not key:
            raise ValueError(f"no variable name on line '{line}'")
        if " " in key or "\t" in key:
            raise ValueError(f"variable '{key}' contains whitespaces")
        if not eq:
            raise ValueError(f"'{key}' has no value: it would be read from docker's client")
        out[key] = value
    return out


# --- A Docker Engine that creates nothing, for Docker's own CLI -----------------------------

class DockerEngineStub:
    """Just enough of the Docker Engine API, on a Unix socket, for `docker run -d` to send the
    container it would create: the CLI parses every option, env files included, before the
    daemon sees anything, so `created` holds Docker's own reading of the command line."""

    def __init__(self, folder: Path):
        self.socket, self.created = folder / "engine.sock", []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                for k, v in (("Api-Version", "1.47"), ("Ostype", "linux"),
                             ("Content-Type", "application/json"),
                             ("Content-Length", str(len(body)))):
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                self.reply(200 if self.path.endswith("/_ping") else 404, b"OK")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if "/containers/create" in self.path:
                    stub.created.append(json.loads(body))
                    return self.reply(201, b'{"Id": "0123456789ab", "Warnings": []}')
                self.reply(204 if self.path.endswith("/start") else 404)

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.socket.unlink(missing_ok=True)
        self.server = Server(str(self.socket), Handler)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.socket.unlink(missing_ok=True)

    def run(self, command: str, home: Path) -> subprocess.CompletedProcess:
        """A `docker run ...` line, in bash on the host (so `~` is the host's home)."""
        env = {"PATH": os.environ["PATH"], "HOME": str(home),
               "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(home / ".docker")}
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True,
                              text=True, timeout=60)


def docker_cli() -> str:
    return shutil.which("docker") or pytest.skip("no Docker CLI on this machine")


# --- Stand-in hosts -----------------------------------------------------------------------

SSH = '''#!{python}
"""Stand-in ssh: the host is the folder $VIT_HOSTS/<address>. As sshd does, the remote
command (the words after user@host, joined by spaces) runs in the user's shell with a fresh
login environment, in a session of its own."""
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args = args[2:] if args[0] in ("-i", "-o", "-L", "-p", "-l") else args[1:]
target, command = args[0].partition("@")[2], " ".join(args[1:])
host = os.path.join(os.environ["VIT_HOSTS"], target)
if not os.path.isdir(host):
    sys.exit(f"ssh: connect to host {{target}} port 22: No route to host")
home = os.path.join(host, "home")
os.chdir(home)
try:
    os.setsid()          # no controlling terminal for the interactive shells Ray asks for
except OSError:          # already a session leader
    pass
os.execve("/bin/bash", ["bash", "-c", command],
          {{"HOME": home, "USER": "ubuntu", "LOGNAME": "ubuntu", "SHELL": "/bin/bash",
           "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}})
'''

AWS = '''#!{python}
"""Stand-in AWS CLI: Secrets Manager's get-secret-value, from the host's secrets.json (what
its instance role may read); any other call fails, as a typo would on AWS."""
import json, os, sys
args = sys.argv[1:]
shape = ["secretsmanager", "get-secret-value", "--secret-id", None, "--query", "SecretString",
         "--output", "text"]
if len(args) != len(shape) or any(s is not None and a != s for a, s in zip(args, shape)):
    sys.exit("aws stand-in: not simulated: aws " + " ".join(args))
host = os.path.dirname(os.environ["HOME"])
known = json.load(open(os.path.join(host, "secrets.json")))
if args[3] not in known:
    print("\\nAn error occurred (ResourceNotFoundException) when calling the GetSecretValue "
          "operation: Secrets Manager can't find the specified secret.", file=sys.stderr)
    sys.exit(254)
print(known[args[3]])
'''

DOCKER = '''#!{python}
"""Stand-in docker for one host ($HOME/..): `run` reads its options as Docker does (env
files by the test's transcription of Docker's reader, devices checked against the host's
devices.json, as the daemon does) and records the container in container.json; `exec` runs
the command with the container's environment in its home. The image: the venv's Ray on PATH
(set again by the image's ~/.bashrc after a login shell's /etc/profile), HOME, the Ray
usage-stats setting of infra/Dockerfile, and no EC2 instance metadata (boto3 in the head's
autoscaler fails at once instead of probing 169.254.169.254)."""
import json, os, subprocess, sys

host = os.path.dirname(os.environ["HOME"])
state = os.path.join(host, "container.json")
home = os.path.join(host, "container-home")
image_env = {{"PATH": {container_path!r}, "HOME": home, "LANG": "C.UTF-8",
             "RAY_USAGE_STATS_ENABLED": "0", "AWS_EC2_METADATA_DISABLED": "true"}}
args = sys.argv[1:]


def fail(message, code=1):
    print(message, file=sys.stderr)
    sys.exit(code)


if args[:1] == ["pull"]:
    sys.exit(print(args[1] + ": image is up to date"))
if args[:2] == ["info", "-f"]:
    sys.exit(print("map[io.containerd.runc.v2:{{}} runc:{{}}]"))     # no NVIDIA runtime here
if args[:2] == ["inspect", "-f"]:
    if args[2] == "{{{{json .Config.Env}}}}":
        sys.exit(print(json.dumps([f"{{k}}={{v}}" for k, v in image_env.items()])))
    if not os.path.exists(state):
        fail("Error: No such object: " + args[3])
    if args[2] == "{{{{.State.Running}}}}":
        sys.exit(print("true"))
    fail("docker stand-in: not simulated: docker " + " ".join(args), 125)
if args[:1] == ["run"]:
    valued = {{"--name", "-v", "-e", "--env", "--env-file", "--ulimit", "--shm-size",
              "--device", "--runtime", "--net", "--network"}}
    env, devices, i = dict(image_env, VIT_CONTAINER=host), [], 1
    while args[i].startswith("-"):
        name, eq, value = args[i].partition("=")
        if name in ("--rm", "-d", "-it", "-i", "-t") and not eq:
            i += 1
            continue
        if name not in valued:
            fail(f"unknown flag: {{name}}", 125)
        if not eq:
            value, i = args[i + 1], i + 1
        i += 1
        if name == "--env-file":
            sys.path.insert(0, {root!r})
            from tests.infra.test_launcher import parse_env_file
            try:
                env.update(parse_env_file(open(value, encoding="utf-8").read()))
            except OSError as e:
                fail(f"docker: open {{value}}: {{e.strerror.lower()}}", 125)
        elif name in ("-e", "--env"):
            key, _, val = value.partition("=")
            env[key] = val
        elif name == "--device":
            devices.append(value.split(":")[0])
    present = json.load(open(os.path.join(host, "devices.json")))
    for path in devices:
        if path not in present:
            fail("docker: Error response from daemon: error gathering device information "
                 f"while adding custom device \\"{{path}}\\": no such file or directory.", 125)
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, ".bashrc"), "w") as f:
        f.write(f"export PATH={container_path!r}:$PATH\\n")
    json.dump({{"args": args, "env": env}}, open(state, "w"))
    sys.exit(print("0123456789ab"))
if args[:1] == ["exec"]:
    i, extra = 1, {{}}
    while args[i].startswith("-"):
        if args[i] in ("-e", "--env"):
            key, _, val = args[i + 1].partition("=")
            extra[key], i = val, i + 1
        i += 1
    if not os.path.exists(state):
        fail("Error response from daemon: No such container: " + args[i])
    env = {{**json.load(open(state))["env"], **extra}}
    sys.exit(subprocess.run(args[i + 1:], env=env, cwd=home).returncode)
fail("docker stand-in: not simulated: docker " + " ".join(args), 125)
'''

RAY = '''#!/usr/bin/env bash
# The image's `ray`, except `ray stop`: the real one stops every Ray process of the user on
# the machine; here the nodes are neighbours (and other sessions run Ray too), so it stops
# the processes of this container only (tests/infra/test_launcher.py, stop_container).
if [ "${{1:-}}" = stop ]; then
    exec {python} -c "import sys; sys.path.insert(0, {root!r})
from tests.infra.test_launcher import stop_container
print('Stopped', len(stop_container(sys.argv[1])), 'processes')" "$VIT_CONTAINER"
fi
exec {bin}/ray "$@"
'''


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def stand_ins(root: Path) -> SimpleNamespace:
    """The stand-in executables: `ssh` for the launcher's side, `docker`, `aws` and `python3`
    on every host, `ray` in every container."""
    container_bin = root / "bin-container"
    container_path = f"{container_bin}:{BIN}:/usr/local/bin:/usr/bin:/bin"
    fill = {"python": sys.executable, "root": str(ROOT), "bin": str(BIN),
            "container_path": container_path}
    _script(root / "bin-launcher" / "ssh", SSH.format(**fill))
    _script(root / "bin-host" / "aws", AWS.format(**fill))
    _script(root / "bin-host" / "docker", DOCKER.format(**fill))
    (root / "bin-host" / "python3").symlink_to(sys.executable)   # the AMI's python3
    _script(container_bin / "ray", RAY.format(**fill))
    (root / "hosts").mkdir()
    return SimpleNamespace(root=root, hosts=root / "hosts", launcher_bin=root / "bin-launcher")


def add_host(ns: SimpleNamespace, address: str, known: dict, devices=()) -> Path:
    """A host: its home (with the ~/.bashrc that puts the host's tools on PATH), the secrets
    its instance role may read, the device paths it has."""
    host = ns.hosts / address
    (host / "home").mkdir(parents=True)
    (host / "home" / ".bashrc").write_text(f"export PATH={ns.root}/bin-host:/usr/bin:/bin\n")
    (host / "secrets.json").write_text(json.dumps(known))
    (host / "devices.json").write_text(json.dumps(sorted(devices)))
    return host


def stop_container(*markers: str, grace: float = 10.0) -> list[int]:
    """Stop the processes of stand-in containers, as `ray stop` does (SIGTERM, SIGKILL after
    `grace` s): those whose environment holds VIT_CONTAINER=<marker>, which every process
    started in that container inherits, Ray's daemons included. The caller and its parents
    (the shells running `ray stop` are in the container too) are spared."""
    needles = {f"VIT_CONTAINER={marker}".encode() for marker in markers}
    spared, pid = set(), os.getpid()
    while pid > 1:
        spared.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break

    def members() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in spared:
                try:
                    environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if needles.intersection(environ):
                    found.append(int(entry))
        return found

    def signal_all(pids: list[int], sig: int) -> None:
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    stopped = members()
    signal_all(stopped, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while members() and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_all(members(), signal.SIGKILL)
    return stopped


def host_runner(config: dict, address: str):
    """The command runner NodeUpdater gets for a node at `address` (provider.get_command_runner
    with the cluster's docker block: a DockerCommandRunner over an SSHCommandRunner)."""
    provider = one_machine_provider()(config["provider"], config["cluster_name"], nodes={
        "i-test": {"tags": {}, "external_ip": address, "internal_ip": address}})
    return provider.get_command_runner("", "i-test", config["auth"], config["cluster_name"],
                                       subprocess, True, config["docker"])


def one_machine_provider():
    from ray.autoscaler.node_provider import NodeProvider

    class OneMachineProvider(NodeProvider):
        """EC2 for the test: node id -> tags and addresses (the stand-in ssh maps an address
        to its host folder); create_node launches the one instance waiting in `pending`."""

        def __init__(self, provider_config, cluster_name, nodes=None, pending=None):
            super().__init__(provider_config, cluster_name)
            self.nodes, self.pending = nodes or {}, pending

        def non_terminated_nodes(self, tag_filters):
            return [i for i, n in self.nodes.items()
                    if all(n["tags"].get(k) == v for k, v in tag_filters.items())]

        def is_running(self, node_id):
            return node_id in self.nodes

        def is_terminated(self, node_id):
            return node_id not in self.nodes

        def node_tags(self, node_id):
            return dict(self.nodes[node_id]["tags"])

        def set_node_tags(self, node_id, tags):
            self.nodes[node_id]["tags"].update(tags)

        def external_ip(self, node_id):
            return self.nodes[node_id]["external_ip"]

        def internal_ip(self, node_id):
            return self.nodes[node_id]["internal_ip"]

        def create_node(self, node_config, tags, count):
            node_id, addresses = self.pending
            self.nodes[node_id] = {"tags": dict(tags), **addresses}

        def terminate_node(self, node_id):
            self.nodes.pop(node_id)

    return OneMachineProvider


def launch(spec_file: str) -> None:
    """Bring one node up as Ray's launcher does, in this process (a subprocess of the test, as
    `ray up` is): the head through `ray up`'s get_or_create_head_node, a worker through the v2
    autoscaler's RayInstaller. Prints the node's final status tag."""
    from ray.autoscaler._private import commands
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.instance_manager.ray_installer import RayInstaller
    from ray.core.generated.instance_manager_pb2 import Instance

    spec = json.loads(Path(spec_file).read_text())
    config, node_id = spec["config"], spec["node_id"]
    addresses = {"external_ip": spec["ssh_ip"], "internal_ip": spec["internal_ip"]}
    Provider = one_machine_provider()
    if spec["head"]:
        provider = Provider(config["provider"], config["cluster_name"],
                            pending=(node_id, addresses))
        # --no-monitor-on-head only skips the copy of the bootstrap config and SSH key to the
        # head (rsync, chown to the SSH user: a remote host's business); the test wrote the
        # config into the head's container, and the head's start command starts the monitor.
        commands.get_or_create_head_node(prepare_config(config), spec["config_file"],
                                         no_restart=False, restart_only=False, yes=True,
                                         override_cluster_name=None, no_monitor_on_head=True,
                                         _provider=provider, _runner=subprocess)
    else:
        provider = Provider(config["provider"], config["cluster_name"], nodes={node_id: {
            "tags": {TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                     TAG_RAY_USER_NODE_TYPE: spec["node_type"]}, **addresses}})
        try:
            RayInstaller(provider, AutoscalingConfig(config)).install_ray(
                Instance(instance_type=spec["node_type"], cloud_instance_id=node_id),
                head_node_ip=spec["head_ip"])
        except Exception as e:     # install_ray raises when the node is not up to date
            print(f"install_ray: {e}", file=sys.stderr)
    print("NODE_STATUS", provider.node_tags(node_id).get(TAG_RAY_NODE_STATUS), flush=True)


def run_launcher(ns: SimpleNamespace, name: str, **spec) -> SimpleNamespace:
    """`launch` in a subprocess (its output, Ray's and the nodes', to a file: the daemons that
    `ray start` leaves behind keep no pipe open) -> status and output."""
    spec_file, log = ns.root / f"{name}.json", ns.root / f"{name}.log"
    spec_file.write_text(json.dumps({"config_file": str(CLUSTER), **spec}))
    env = {**os.environ, "PATH": f"{ns.launcher_bin}:{os.environ['PATH']}",
           "VIT_HOSTS": str(ns.hosts), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-c", "import sys\nfrom tests.infra.test_launcher "
                        "import launch\nlaunch(sys.argv[1])", str(spec_file)], cwd=ROOT,
                       env=env, stdout=out, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=300)
    text = log.read_text(errors="replace")
    status = [ln.split()[1] for ln in text.splitlines() if ln.startswith("NODE_STATUS ")]
    return SimpleNamespace(status=status[-1] if status else None, output=text)


def on_one_machine(config: dict, root: Path, ports: dict) -> dict:
    """The YAML with only what two nodes on one machine force: ports of their own (the
    YAML's fixed ports would collide with each other and with other Ray clusters here) and a
    short --temp-dir each (Ray's Unix socket paths must stay under 108 bytes)."""
    config = copy.deepcopy(config)

    def swap(command: str, changes: dict) -> str:
        for old, new in changes.items():
            assert command.count(old) == 1, (old, command)
            command = command.replace(old, new)
        return command

    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    head[-1] = swap(head[-1], {
        "--port=6379": f"--port={ports['gcs']}",
        "--object-manager-port=8076": f"--object-manager-port={free_port()}",
        "ray start --head": f"ray start --head --temp-dir={root}/h "
                            f"--dashboard-port={ports['dashboard']} "
                            f"--ray-client-server-port={free_port()} "
                            f"--dashboard-agent-listen-port={free_port()}"})
    worker[-1] = swap(worker[-1], {
        "$RAY_HEAD_IP:6379": f"$RAY_HEAD_IP:{ports['gcs']}",
        "--object-manager-port=8076": f"--object-manager-port={free_port()}",
        "ray start --address": f"ray start --temp-dir={root}/w "
                               f"--dashboard-agent-listen-port={free_port()} --address"})
    return config


# --- Per node type ------------------------------------------------------------------------

@pytest.mark.parametrize("node_type", NODE_TYPES)
def test_efa_settings_only_where_the_node_type_has_efa(node_type):
    """EFA devices, libfabric's EFA settings and the placement group iff the node type's
    instances have EFA interfaces; every --device path exists on that instance; every node,
    the head included, starts with the env file that holds the Ray token."""
    config = cluster_config()
    node = config["available_node_types"][node_type]
    command = docker_run_command(config, node_type)
    flags = run_flags(command)
    efa = efa_interfaces(node["node_config"]) > 0
    assert ("/dev/infiniband" in flags["--device"]) == efa
    assert set(flags["--device"]) <= host_devices(node["node_config"])
    fi = {e for e in flags["-e"] if e.startswith("FI_")}
    assert fi == ({"FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1"} if efa else set())
    assert ("Placement" in node["node_config"]) == efa
    if efa:    # a cluster placement group keeps EFA's nodes on one spine
        assert node["node_config"]["Placement"]["GroupName"]
    assert flags["--env-file"] == [ENV_FILE]
    if node_type == config["head_node_type"]:
        # `ray up` never reads a head type's own docker block: it would be ignored silently.
        assert "docker" not in node
        docker = config["docker"]
        assert command.count(" ".join(docker["run_options"] + docker.get("head_run_options",
                                                                          []))) == 1
    assert "--net=host" in command        # dashboard on 127.0.0.1 = the host's loopback


def test_a_run_option_set_at_the_top_is_replaced_by_a_types_own():
    """Ray's merge, the reason the EFA options live in the p5 type only: a type's
    worker_run_options replace the top-level ones (dict.update), they are not added."""
    config = cluster_config()
    config["docker"]["worker_run_options"] = ["--device=/dev/fuse"]
    efa = [t for t, n in config["available_node_types"].items()
           if efa_interfaces(n["node_config"])]
    other = [t for t in NODE_TYPES if t not in efa and t != config["head_node_type"]]
    assert efa and other
    assert "/dev/fuse" not in run_flags(docker_run_command(config, efa[0]))["--device"]
    assert "/dev/fuse" in run_flags(docker_run_command(config, other[0]))["--device"]


def test_docker_reads_every_node_types_run_command(tmp_path):
    """Each node type's `docker run`, as Ray builds it, through Docker's own CLI (to a stub
    engine that creates nothing): accepted, and read as the table test reads it."""
    docker_cli()
    config = cluster_config()
    short = Path(tempfile.mkdtemp(prefix="de", dir="/tmp"))   # a Unix socket path < 108 B
    (tmp_path / ".vit-pipeline.env").write_text("RAY_AUTH_MODE=token\n")
    try:
        with DockerEngineStub(short) as engine:
            for node_type in NODE_TYPES:
                command = docker_run_command(config, node_type)
                done = engine.run(command, tmp_path)
                assert done.returncode == 0, (node_type, done.stderr)
                created = engine.created[-1]
                devices = [d["PathOnHost"] for d in created["HostConfig"]["Devices"] or []]
                assert devices == run_flags(command)["--device"]
                assert {e for e in created["Env"] if e.startswith("FI_")} == \
                    {e for e in run_flags(command)["-e"] if e.startswith("FI_")}
                assert "RAY_AUTH_MODE=token" in created["Env"]
                assert created["HostConfig"]["NetworkMode"] == "host"
                assert created["HostConfig"]["ShmSize"] == 32 * 2**30
        broken = docker_run_command(config, NODE_TYPES[0]).replace("--net=host",
                                                                    "--no-such-flag")
        with DockerEngineStub(short) as engine:          # the check can fail
            assert engine.run(broken, tmp_path).returncode != 0
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_the_image_leaves_efa_settings_to_the_node_types():
    """FI_* in the image would reach every node; the EFA libraries stay in it."""
    env_lines = [ln for ln in DOCKERFILE.read_text().splitlines()
                 if ln.startswith(("ENV", "    ")) and "=" in ln]
    assert not [ln for ln in env_lines if "FI_" in ln]
    assert any("/opt/amazon/ofi-nccl/lib" in ln for ln in env_lines)
    assert "efa_installer.sh" in DOCKERFILE.read_text()


# --- Boot commands, on a stand-in host ------------------------------------------------------

@pytest.fixture
def hosts(monkeypatch):
    """Stand-in hosts for commands run through Ray's command runners in this process."""
    root = Path(tempfile.mkdtemp(prefix="vith", dir="/tmp"))
    ns = stand_ins(root)
    monkeypatch.setenv("PATH", f"{ns.launcher_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("VIT_HOSTS", str(ns.hosts))
    yield ns
    shutil.rmtree(root, ignore_errors=True)


def run_on_host(config: dict, address: str, command: str) -> None:
    """As NodeUpdater runs an initialization command: on the host, outside the container."""
    host_runner(config, address).run(command, ssh_options_override_ssh_key=None,
                                      run_env="host")


TRICKY = {"MLFLOW_TRACKING_USERNAME": "  admin with spaces  ",
          "MLFLOW_TRACKING_PASSWORD": "\"quoted\" 'both' = #not-a-comment $HOME `id` \\n \\ é ✓",
          "MLFLOW_TRACKING_INSECURE_TLS": "'single'"}


def test_the_env_file_holds_the_token_and_credentials_exactly(hosts, tmp_path, capfd):
    """The init command, run as the launcher runs it, writes an env file that Docker's reader
    turns back into exactly the secrets' values (spaces, quotes, =, # and $ included), mode
    0600, no token in its output; Docker's own CLI reads the same."""
    config = cluster_config()
    key = secrets.token_hex(32)
    host = add_host(hosts, "10.0.0.7", {"vit-pipeline/ray-token": key,
                                        "vit-pipeline/mlflow": json.dumps(TRICKY)})
    for command in config["initialization_commands"]:
        run_on_host(config, "10.0.0.7", command)
    env_file = host / "home" / ".vit-pipeline.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    text = env_file.read_text(encoding="utf-8")
    assert parse_env_file(text) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": key, **TRICKY}
    out = capfd.readouterr()
    assert key not in out.out + out.err
    assert not (host / "home" / ".vit-pipeline.env.new").exists()
    if shutil.which("docker"):
        short = Path(tempfile.mkdtemp(prefix="de", dir="/tmp"))
        try:
            with DockerEngineStub(short) as engine:
                done = engine.run(f"docker run -d --env-file {env_file} img true", tmp_path)
                assert done.returncode == 0, done.stderr
                assert engine.created[0]["Env"] == [f"{k}={v}" for k, v in
                                                    parse_env_file(text).items()]
        finally:
            shutil.rmtree(short, ignore_errors=True)


def test_env_file_reader_follows_docker():
    """The transcription itself, on the cases its docstring names (it can fail)."""
    assert parse_env_file("\ufeff# c\n  A= x \"y\" \r\n\nB=1=2\n#C=3\n") == \
        {"A": " x \"y\" ", "B": "1=2"}
    for bad in ("A B=1\n", "=1\n", "A\n"):
        with pytest.raises(ValueError):
            parse_env_file(bad)


@pytest.mark.parametrize("known, message", [
    ({}, "cannot read the Ray token (secret vit-pipeline/ray-token: An error occurred "
         "(ResourceNotFoundException)"),
    ({"vit-pipeline/ray-token": ""}, "vit-pipeline/ray-token is empty or not one word"),
    ({"vit-pipeline/ray-token": "two words"}, "vit-pipeline/ray-token is empty or not one word"),
    ({"vit-pipeline/ray-token": "k" * 64,
      "vit-pipeline/mlflow": json.dumps({"MLFLOW_TRACKING_PASSWORD": "a\nRAY_AUTH_MODE=x"})},
     "MLFLOW_TRACKING_PASSWORD in the secret vit-pipeline/mlflow holds a line break"),
    ({"vit-pipeline/ray-token": "k" * 64,
      "vit-pipeline/mlflow": json.dumps({"RAY_AUTH_MODE": "disabled"})},
     "must be a JSON object of MLFLOW_* names"),
], ids=["no-token", "empty-token", "two-words", "line-break", "not-mlflow"])
def test_the_init_command_fails_closed(hosts, capfd, known, message):
    """No usable token (or credentials that would break the env file or reach past MLflow):
    the command fails with one line, and the env file from the previous boot is untouched."""
    import click

    config = cluster_config()
    host = add_host(hosts, "10.0.0.8", known)
    before = "# the previous boot's file\n"
    (host / "home" / ".vit-pipeline.env").write_text(before)
    with pytest.raises(click.ClickException):
        run_on_host(config, "10.0.0.8", config["initialization_commands"][0])
    ours = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("vit-pipeline:")]
    assert len(ours) == 1 and message in ours[0], ours
    if "ray-token" in message:      # the line says how to make a token
        assert "aws secretsmanager" in ours[0] and "openssl rand -hex 32" in ours[0]
    assert (host / "home" / ".vit-pipeline.env").read_text() == before
    assert not (host / "home" / ".vit-pipeline.env.new").exists()
    assert "k" * 64 not in ours[0]


def test_without_the_mlflow_secret_the_node_boots_without_credentials(hosts, capfd):
    config = cluster_config()
    host = add_host(hosts, "10.0.0.9", {"vit-pipeline/ray-token": "k" * 64})
    run_on_host(config, "10.0.0.9", config["initialization_commands"][0])
    env = parse_env_file((host / "home" / ".vit-pipeline.env").read_text())
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "k" * 64}
    assert "no MLflow credentials (secret vit-pipeline/mlflow" in capfd.readouterr().err


@pytest.mark.parametrize("which", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_start_refuses_to_run_without_a_token(which, tmp_path):
    """The start commands ask for token mode themselves: a container whose env file lost the
    token gets no Ray at all (Ray raises before it starts a process)."""
    config = on_one_machine(cluster_config(), tmp_path, {"gcs": free_port(),
                                                         "dashboard": free_port()})
    command = config[which][-1]
    marker = str(tmp_path)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_HEAD_IP": "127.0.0.1",
           "RAY_USAGE_STATS_ENABLED": "0", "VIT_CONTAINER": marker}
    try:
        done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    finally:
        leftovers = stop_container(marker, grace=2)
    assert done.returncode != 0
    assert "no authentication token was found" in done.stderr, done.stderr[-2000:]
    assert not leftovers


# --- A cluster brought up by the launcher's code ------------------------------------------------

HEAD_SSH, WORKER_SSH, NO_SECRET_SSH = "203.0.113.10", "10.0.0.2", "10.0.0.3"
MLFLOW = {"MLFLOW_TRACKING_USERNAME": "vit admin",
          "MLFLOW_TRACKING_PASSWORD": "p\"a'ss word=#1"}

JOB = """
import hashlib, json, os, ray
ray.init()
def digest():
    names = ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD')
    return [hashlib.sha256(os.environ.get(n, '').encode()).hexdigest() for n in names]
@ray.remote(num_cpus=1)
def elsewhere():
    return ray.get_runtime_context().get_node_id(), digest()
node, there = ray.get(elsewhere.remote())
print('RESULT', json.dumps({'nodes': sum(n['Alive'] for n in ray.nodes()),
      'driver_node': ray.get_runtime_context().get_node_id(), 'task_node': node,
      'driver': digest(), 'task': there}))
"""


def digest_of(values: dict) -> list[str]:
    import hashlib

    return [hashlib.sha256(values[n].encode()).hexdigest()
            for n in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]


def laptop(tmp: Path, **extra) -> dict:
    """A user's shell: no Ray token anywhere (no RAY_AUTH_*, no ~/.ray/auth_token)."""
    home = tmp / "laptop"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
            **extra}


def submit(dashboard: str, env: dict, *entrypoint: str, timeout: float = 180):
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
                           *entrypoint], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def http_status(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def launched():
    """A head (`ray up`'s path) and a g5 worker (the autoscaler's path) booted from the YAML
    on stand-in hosts, the Ray token and MLflow credentials in their stand-in Secrets
    Manager; then, while the tests run, a `ray start` that tries to join without the token
    (it takes Ray ~20 s to give up). Every process of theirs is stopped at the end, on
    failure too."""
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.util import prepare_config

    root = Path(tempfile.mkdtemp(prefix="vitl", dir="/tmp"))
    ns = stand_ins(root)
    key = secrets.token_hex(32)
    known = {"vit-pipeline/ray-token": key, "vit-pipeline/mlflow": json.dumps(MLFLOW)}
    config = cluster_config()
    worker_type = next(t for t, n in config["available_node_types"].items()
                       if t != config["head_node_type"] and not efa_interfaces(n["node_config"]))
    head = add_host(ns, HEAD_SSH, known)
    worker = add_host(ns, WORKER_SSH, known,
                      host_devices(config["available_node_types"][worker_type]["node_config"]))
    ports = {"gcs": free_port(), "dashboard": free_port()}
    config = on_one_machine(config, root, ports)
    ip = get_node_ip_address()        # what `ray start` binds to, and the head's internal IP
    intruder = root / "intruder"
    intruder.mkdir()
    attempt = None
    try:
        (head / "container-home").mkdir()    # what `ray up` copies before starting Ray
        (head / "container-home" / "ray_bootstrap_config.yaml").write_text(
            json.dumps({**prepare_config(config), "no_restart": False}))
        up = run_launcher(ns, "head", config=config, head=True, node_id="i-head",
                          node_type=config["head_node_type"], ssh_ip=HEAD_SSH, internal_ip=ip)
        assert up.status == "up-to-date", up.output[-4000:]
        joined = run_launcher(ns, "worker", config=config, head=False, node_id="i-worker",
                              node_type=worker_type, ssh_ip=WORKER_SSH,
                              internal_ip=WORKER_SSH, head_ip=ip)
        assert joined.status == "up-to-date", joined.output[-4000:]
        # No RAY_AUTH_MODE, no token anywhere: as an intruder, or a node that lost its token.
        with open(root / "intruder.log", "wb") as log:
            attempt = subprocess.Popen(
                ["bash", "-c", f"ray start --address={ip}:{ports['gcs']} --temp-dir={root}/x "
                               f"--dashboard-agent-listen-port={free_port()} "
                               f"--object-manager-port={free_port()}"],
                env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(intruder),
                     "RAY_USAGE_STATS_ENABLED": "0", "VIT_CONTAINER": str(intruder)},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        yield SimpleNamespace(ns=ns, key=key, ip=ip, head=head, worker=worker, config=config,
                              outputs=[up, joined], attempt=attempt, intruder=intruder,
                              dashboard=f"http://127.0.0.1:{ports['dashboard']}")
    finally:
        if attempt is not None and attempt.poll() is None:
            os.killpg(attempt.pid, signal.SIGKILL)
            attempt.wait()
        stop_container(str(intruder), *(str(host) for host in ns.hosts.iterdir()), grace=5)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_the_launched_cluster_is_closed_to_strangers(launched, tmp_path):
    """The head refuses the dashboard's API and `ray job submit` without the token, serves
    the dashboard on its loopback only, and runs a job with it, on both nodes, with the MLflow
    credentials of the env file in the driver and in a task on the worker. The token is in no
    log, no output and no `docker run` command line."""
    dash, key = launched.dashboard, launched.key
    assert http_status(f"{dash}/api/gcs_healthz") == 200            # health checks stay open
    assert http_status(f"{dash}/api/version") == 401
    assert http_status(f"{dash}/api/jobs/") == 401
    assert http_status(f"{dash}/api/version", key) == 200
    if launched.ip != "127.0.0.1":
        with pytest.raises(urllib.error.URLError):      # not on the node's own address
            urllib.request.urlopen(dash.replace("127.0.0.1", launched.ip) + "/api/gcs_healthz",
                                   timeout=5)
    refused = submit(dash, laptop(tmp_path), "echo", "ran")
    assert refused.returncode != 0 and "ran" not in refused.stdout
    assert "Authentication" in refused.stdout + refused.stderr

    env = laptop(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=key)
    deadline, done = time.monotonic() + 120, None
    while time.monotonic() < deadline:      # the head's job agent registers after the HTTP API
        done = submit(dash, env, "python", "-c", JOB)
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(next(ln for ln in done.stdout.splitlines()
                             if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["nodes"] == 2
    assert result["task_node"] != result["driver_node"]   # the head has no CPU: the worker ran it
    assert result["driver"] == result["task"] == digest_of(MLFLOW)

    for host, node in ((launched.head, "head"), (launched.worker, "worker")):
        args = json.loads((host / "container.json").read_text())["args"]
        assert "--env-file" in args and str(host / "home" / ".vit-pipeline.env") in args
        assert not any(a.startswith("--device") for a in args), (node, args)
        assert key not in " ".join(args)
    texts = [o.output for o in launched.outputs] + [done.stdout, done.stderr]
    assert not [t for t in texts if key in t]
    leaks = []
    for path in launched.ns.root.rglob("*"):
        if path.is_file() and path.name not in ("secrets.json", ".vit-pipeline.env",
                                                "container.json"):
            try:
                if key.encode() in path.read_bytes():
                    leaks.append(str(path))
            except OSError:
                pass
    assert not leaks


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_without_the_token_cannot_join(launched):
    """The fixture's `ray start` without the token: refused by the head's GCS, nothing of it
    left running, the cluster still its two nodes."""
    returncode = launched.attempt.wait(timeout=180)
    leftovers = stop_container(str(launched.intruder), grace=2)
    log = (launched.ns.root / "intruder.log").read_text(errors="replace")
    assert returncode != 0
    assert "AuthenticationError" in log, log[-2000:]
    assert not leftovers
    request = urllib.request.Request(f"{launched.dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {launched.key}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        summary = json.loads(r.read())["data"]["summary"]
    assert sum(n["raylet"]["state"] == "ALIVE" for n in summary) == 2


@pytest.mark.ray
def test_a_node_without_the_token_secret_never_starts_its_container(tmp_path):
    """The autoscaler's path on a host whose role cannot read the token: the node fails at
    its initialization command, with the line naming the create-secret command, before
    any container or Ray process exists."""
    root = Path(tempfile.mkdtemp(prefix="vitn", dir="/tmp"))
    try:
        ns = stand_ins(root)
        host = add_host(ns, NO_SECRET_SSH, {"vit-pipeline/mlflow": json.dumps(MLFLOW)})
        config = on_one_machine(cluster_config(), root, {"gcs": free_port(),
                                                         "dashboard": free_port()})
        worker_type = NODE_TYPES[-1]
        booted = run_launcher(ns, "worker", config=config, head=False, node_id="i-lost",
                              node_type=worker_type, ssh_ip=NO_SECRET_SSH,
                              internal_ip=NO_SECRET_SSH, head_ip="127.0.0.1")
        assert booted.status == "update-failed", booted.output[-3000:]
        assert CREATE_SECRET in booted.output
        assert not (host / "container.json").exists()
        assert not (host / "home" / ".vit-pipeline.env").exists()
    finally:
        leftovers = stop_container(str(root / "hosts" / NO_SECRET_SSH), grace=2)
        shutil.rmtree(root, ignore_errors=True)
    assert not leftovers
