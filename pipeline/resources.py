"""Will the work fit on the cluster? Ray waits without end for resources that never come: a
Train worker group or a Tune trial that no node can hold stays pending, and the command sits
there silently. This module decides before any of it starts:

- the work fits the cluster's nodes (by their total resources; resources other jobs hold
  now come back, so waiting for them is right): go on;
- it does not fit, and the cluster cannot grow (a local Ray, or a cluster without an
  autoscaler): stop at once, naming the numbers and the fix;
- it does not fit, and an autoscaler watches the cluster (KubeRay's, `ray up`'s): ask it
  for the resources (`ray.autoscaler.sdk.request_resources`) and wait with a countdown, up
  to a limit, then stop with the same line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

log = logging.getLogger("pipeline.resources")


class DoesNotFit(RuntimeError):
    """The work cannot be placed on the cluster, now or after waiting (one line)."""


def nodes() -> list[dict[str, float]]:
    """Each alive node's total CPU and GPU."""
    import ray

    return [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]


def can_grow() -> bool:
    """Whether an autoscaler watches the cluster: v2 (KubeRay's) marks itself in the GCS
    key-value store when the cluster starts with it. v1's monitor runs on every head and
    writes its status there; without an autoscaling config (a local Ray, `ray start` by
    hand) its autoscaler is read-only, Ray's BASE_READONLY_CONFIG, whose node types are the
    nodes themselves ("node_<node id>"), while `ray up`'s config names its own types."""
    try:
        from ray._private import ray_constants
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(status).get("autoscaler_report") or {} if status else {}
        types = report.get("node_type_mapping") or {}
        return any(kind != f"node_{node}" for node, kind in types.items())
    except Exception:  # noqa: BLE001 - a Ray without these internals: assume it cannot grow
        return False


def place(bundles: list[dict[str, float]], spare_cpu: float, capacity: list[dict[str, float]],
          spread: bool = False) -> bool:
    """Whether `bundles` (one per worker or trial) fit on nodes of `capacity`, largest
    first, each on the first node with room (one per node when `spread`), leaving
    `spare_cpu` free on some node (a data task)."""
    free = [dict(c) for c in capacity]
    used: set[int] = set()
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)),
                         reverse=True):
        for i, node in enumerate(free):
            if spread and i in used:
                continue
            if all(node.get(k, 0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                used.add(i)
                break
        else:
            return False
    return spare_cpu <= 0 or any(node["CPU"] + 1e-9 >= spare_cpu for node in free)


def describe(capacity: list[dict[str, float]]) -> str:
    cpu = sum(n["CPU"] for n in capacity)
    gpu = sum(n["GPU"] for n in capacity)
    return (f"{len(capacity)} node{'s' if len(capacity) != 1 else ''} with {cpu:g} CPU"
            + (f", {gpu:g} GPU" if gpu else "") + " in all")


def ensure_fits(bundles: list[dict[str, float]], spare_cpu: float, what: str, fix: str,
                wait_s: float, spread: bool = False,
                capacity: Callable[[], list[dict[str, float]]] = nodes,
                growable: Callable[[], bool] = can_grow, every_s: float = 10.0) -> None:
    """Return when `bundles` (+ `spare_cpu`) fit the cluster; raise DoesNotFit at once
    when they cannot and the cluster cannot grow, or after `wait_s` of waiting for an
    autoscaler. `what` names the demand ("2 workers x 1 CPU, plus 1 CPU for the data
    tasks"), `fix` what to change ("--cpus-per-worker, or fewer --workers")."""
    have = capacity()
    if place(bundles, spare_cpu, have, spread):
        return
    if not growable():
        raise DoesNotFit(f"{what} do not fit on this cluster ({describe(have)}), which cannot "
                         f"grow (a local Ray, or no autoscaler); {fix}")
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[*bundles, *([{"CPU": spare_cpu}] if spare_cpu else [])])
    except Exception as err:  # noqa: BLE001 - the wait below still bounds it
        log.debug("request_resources failed: %s", err)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        left = deadline - time.monotonic()
        log.warning("waiting for the cluster to grow: %s need more than %s; %d s left "
                    "(scale.wait_for_resources_s)", what, describe(have), left)
        time.sleep(min(every_s, max(left, 0.0)))
        have = capacity()
        if place(bundles, spare_cpu, have, spread):
            log.info("the cluster grew to %s: going on", describe(have))
            return
    raise DoesNotFit(f"{what} do not fit on this cluster ({describe(have)}), which did not "
                     f"grow in {wait_s:g} s; {fix}")
