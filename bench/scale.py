"""A scale model of the control plane: what each part that every worker talks to costs as the
cluster grows, measured here at small N, fitted, and projected to 8, 64, 256 and 1,024 GPUs
next to the time of a training step.

    position   the data position gathered at a checkpoint: what each worker sends (its
               samples as ids before issue 27, as runs of indices now) and rank 0's update;
               simulated in-process for up to 1,024 workers (the data path's blocks, the
               split's turns and each worker's shuffle buffer)
    dealer     the ReadDealer actor's calls/s under N concurrent callers, 1 and 16 reads a
               call; now `stream.dealing` picks reads a call and how many dealers; the
               data-health actor, which the read tasks call as often (its capacity is a
               dealer's: one small Python actor)
    listing    rank 0's listing of a run folder for "latest complete" / retention: a local
               folder with the files of `keep` checkpoints of N ranks
    metrics    rank 0's blocking work at a log step: one MLflow `log_batch` (a SQLite store here)
               and the data-health actor's round trip
    stream     Ray Data's per-block cost in the process that runs the stream (Ray Train's
               split coordinator): 64-row blocks through `streaming_split(n)`; and as the
               runs read now, each consumer executing a stream of its own (`per_worker`)
    tune       Ray Tune's controller with many short trials (no-op trainables)

    python bench/scale.py                      # everything, ~3 min on 2 cores
    python bench/scale.py --only position dealer --samples 4194304

The model (bench/RESULTS.md): B/16 at 3,400 images/s per H100 (measured figures for B/16
training at 224 px, bf16), the B/16-i21k preset's global batch of 4,096, log every 50 steps,
checkpoint every 2,000, 1,000-sample shards, 64-row blocks, a 4,096-sample shuffle buffer per
worker. A step at N GPUs is then 4,096 / (3,400 N) s: 1.2 ms at 1,024 (4 images per GPU; a
real run that size would raise the batch, which only makes every part below cheaper per step).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.data.plan import DataPosition, StreamPlan, compact, sample_ranges
from pipeline.train.loop import SHUFFLE_STEPS

ROOT = Path(__file__).resolve().parents[1]

GPUS = (8, 64, 256, 1024)


def run_threads(target, n: int) -> float:
    """`target(i)` for i in range(n), each in its own thread, at once; -> wall seconds."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0
IMG_PER_GPU_S = 3400          # B/16, 224 px, bf16, one H100 (issue 27)
GLOBAL_BATCH = 4096           # vit_b16_i21k
LOG_EVERY = 50                # TrainConfig.log_every
CHECKPOINT_EVERY = 2000       # vit_b16_i21k's checkpoint.every
SHARD = 1000                  # samples per shard
I21K_SHARDS = 14_000          # ImageNet-21k's ~14M images in such shards
BLOCK = 64                    # DataConfig.block_rows
BUFFER = 4096                 # DataConfig.shuffle_buffer (per worker)
KEEP = 3                      # checkpoints kept (plus one in flight)
S3_PAGE_S = 0.08              # an S3 ListObjectsV2 page of 1,000 keys (assumed)
MLFLOW_RTT_S = 0.02           # a log_batch to a remote tracking server (assumed)


def step_s(n: int) -> float:
    return GLOBAL_BATCH / (IMG_PER_GPU_S * n)


def fit(xs, ys, law: str):
    """Least squares of y = a + b f(x), f by `law` ("N", "N log N", "1"). -> (a, b)."""
    x = np.asarray(xs, float)
    f = {"N": x, "1": np.zeros_like(x), "N log N": x * np.log2(np.maximum(x, 2))}[law]
    if law == "1":
        return float(np.mean(ys)), 0.0
    b, a = np.polyfit(f, np.asarray(ys, float), 1)
    return float(a), float(b)


def at(law: str, a: float, b: float, n: float) -> float:
    f = {"N": n, "1": 0.0, "N log N": n * np.log2(max(n, 2))}[law]
    return a + b * f


# ---------------------------------------------------------------------------------------------
# The data position at a checkpoint
# ---------------------------------------------------------------------------------------------
def consumption(n: int, samples: int, micro: int, buffer: int, block: int = BLOCK,
                shard: int = SHARD, seed: int = 0):
    """Per worker, the ids it trained in the second of two checkpoint intervals of `samples`
    each: the reads dealt in turn to the read tasks, their samples cut into `block`-row blocks,
    the blocks handed to the workers in turn (Ray Train's split), each worker's stream mixed in
    a shuffle buffer of max(buffer, 2 micro) that is never drained at a checkpoint: the samples
    in it when the first interval ends are trained in the second, those in it when the second
    ends are not. -> (plan, [ids (3, k) per worker])."""
    rng = np.random.default_rng(seed)
    slots = max(2, min(4 * n, 4096))
    total = 2 * samples + 4 * n * block
    reads = -(-total // shard) + slots
    plan = StreamPlan((shard,) * reads)
    number = np.arange(reads)
    # Slot j reads j, j + slots, ...; its rows are blocks; slots' blocks interleave.
    per_slot = [number[j::slots] for j in range(slots)]
    blocks = []
    for j, mine in enumerate(per_slot):
        rows = np.stack([np.repeat(mine, shard), np.tile(np.arange(shard), len(mine))])
        cut = np.arange(0, rows.shape[1], block)
        blocks += [(k, j, rows[:, c:c + block]) for k, c in enumerate(cut)]
    blocks.sort(key=lambda x: (x[0], x[1]))
    stream = np.concatenate([b for *_, b in blocks], axis=1)[:, :total]
    owner = np.repeat(np.arange(len(blocks)) % n, block)[:stream.shape[1]]
    held = max(buffer, 2 * micro)
    out = []
    for w in range(n):
        mine = stream[:, owner == w]
        per = samples // n
        first, second = mine[:, :per], mine[:, per:2 * per]
        # What the buffer holds at each checkpoint: `held` of the latest samples, older ones
        # fewer (drawn from the last 2 x held).
        def held_of(part):
            window = min(part.shape[1], 2 * held)
            return part.shape[1] - window + rng.choice(window, min(held, window // 2),
                                                        replace=False)
        h1, h2 = held_of(first), held_of(second)
        keep = np.ones(second.shape[1], bool)
        keep[h2] = False
        ids = np.concatenate([first[:, h1], second[:, keep]], axis=1)
        epoch, position = np.divmod(ids[0], len(plan.sizes))
        order = np.asarray(plan.order(0))
        out.append(np.stack([epoch, order[position], ids[1]]))
    # The first interval, as rank 0 holds it when the second is gathered.
    before = []
    for w in range(n):
        mine = stream[:, owner == w][:, :samples // n]
        before.append(mine)
    return plan, out, np.concatenate(before, axis=1)


def _position_before(plan: StreamPlan, first: np.ndarray, ids: list) -> DataPosition:
    """The position after the first interval: all of it but what the workers still held."""
    held = {tuple(x) for a in ids for x in a.T.tolist()}
    order = np.asarray(plan.order(0))
    e, p = np.divmod(first[0], len(plan.sizes))
    rows = [x for x in zip(e.tolist(), order[p].tolist(), first[1].tolist(), strict=True)
            if x not in held]
    return DataPosition().advance(plan, *np.asarray(rows).T)


def measure_position(ns, samples: int, capped: bool = True) -> dict:
    res = {}
    # The interval is simulated shorter than the preset's; the shuffle buffer shrinks with it,
    # so that every count below (reads, blocks, the samples held in buffers) scales with it.
    shrink = samples / (CHECKPOINT_EVERY * GLOBAL_BATCH)
    for n in ns:
        micro = max(round(GLOBAL_BATCH / n * shrink), 1)
        buffer = min(BUFFER, SHUFFLE_STEPS * GLOBAL_BATCH // n) if capped else BUFFER
        plan, ids, first = consumption(n, samples, micro, max(round(buffer * shrink), 1))
        start = _position_before(plan, first, ids)
        old_bytes = sum(len(pickle.dumps(a.astype(np.int64))) for a in ids)
        t0 = time.perf_counter()
        sent = [compact(sample_ranges(*a)).astype(np.int32) for a in ids]
        compact_s = (time.perf_counter() - t0) / n
        new_bytes = sum(len(pickle.dumps(r)) for r in sent)
        t0 = time.perf_counter()
        new = start.advance_ranges(plan, np.concatenate(sent))
        new_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cat = np.concatenate(ids, axis=1)
        old = start.advance(plan, cat[0], cat[1], cat[2])
        old_s = time.perf_counter() - t0
        assert new == old, "ranges and ids must give the same position"
        import json
        res[n] = {"old_bytes": old_bytes, "new_bytes": new_bytes,
                  "rows": sum(len(r) for r in sent), "old_s": old_s, "new_s": new_s,
                  "compact_s": compact_s, "json": len(json.dumps(new.to_dict()))}
        print(f"  N={n:5d}  ids {old_bytes / 1e6:8.2f} MB  ranges {new_bytes / 1e6:7.3f} MB "
              f"({res[n]['rows']:7d} rows)  rank 0: ids {old_s * 1e3:7.1f} ms, ranges "
              f"{new_s * 1e3:6.1f} ms  compact/worker {compact_s * 1e3:5.1f} ms  position "
              f"JSON {res[n]['json'] / 1e3:6.1f} kB", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# The read dealer
# ---------------------------------------------------------------------------------------------
def measure_dealer(callers, seconds: float) -> dict:
    import ray

    from pipeline.data.stream import ReadDealer

    res = {}
    for k in (1, 16):
        for n in callers:
            actor = ray.remote(num_cpus=0)(ReadDealer).remote(0, 1 << 60)
            ray.get(actor.deal.remote(0, 0))
            counts = [0] * n
            stop = time.perf_counter() + seconds

            def call(slot: int, actor=actor, stop=stop, k=k, counts=counts):
                got = 1 if slot == 0 else 0
                while time.perf_counter() < stop:
                    got += len(ray.get(actor.deal_many.remote(slot, got, k)))
                    counts[slot] += 1

            wall = run_threads(call, n)
            calls = sum(counts)
            res[(k, n)] = {"calls_s": calls / wall, "reads_s": calls * k / wall}
            print(f"  {k:2d} reads/call, {n} callers: {calls / wall:7.0f} calls/s = "
                  f"{calls * k / wall:8.0f} reads/s", flush=True)
            ray.kill(actor)
    return res


# ---------------------------------------------------------------------------------------------
# Listing a run folder
# ---------------------------------------------------------------------------------------------
def measure_listing(ranks) -> dict:
    from pipeline.weights.integrity import listing

    res = {}
    for n in ranks:
        root = Path(tempfile.mkdtemp(prefix="scale-ls-"))
        try:
            for c in range(KEEP + 1):
                d = root / f"step_{(c + 1) * 2000:08d}"
                (d / "state").mkdir(parents=True)
                for name in ("model.safetensors", "vit.json", "train_state.json",
                             "state/.metadata"):
                    (d / name).touch()
                for r in range(n):
                    (d / f"state/__{r}_0.distcp").touch()
                    (d / f"state/sha256_rank{r}.json").touch()
            files = (KEEP + 1) * (2 * n + 4)
            t0 = time.perf_counter()
            for _ in range(3):
                got = listing(str(root))
            took = (time.perf_counter() - t0) / 3
            assert len(got) == files
            res[n] = {"files": files, "local_s": took,
                      "s3_s": -(-files // 1000) * S3_PAGE_S}
            print(f"  {n:5d} ranks: {files:6d} files, local listing {took * 1e3:6.1f} ms; "
                  f"S3 at {S3_PAGE_S * 1e3:.0f} ms a page of 1,000: {res[n]['s3_s']:.2f} s",
                  flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# Rank 0's metrics
# ---------------------------------------------------------------------------------------------
def measure_metrics(repeats: int) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.data.health import DataHealth
    from pipeline.tracking import Tracker

    tmp = tempfile.mkdtemp(prefix="scale-mlflow-")
    try:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("scale"))
        tracker = Tracker(uri, run.info.run_id)
        metrics = {"train/loss": 1.0, "train/lr": 1e-3, "train/grad_norm": 1.0,
                   "train/images_per_step": 4096.0, "perf/images_per_sec": 1.0,
                   "perf/data_wait_frac": 0.0, "perf/mfu": 0.4, "data/skipped_samples": 0.0}
        times = []
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            tracker.log_metrics(metrics, step * LOG_EVERY)
            times.append(time.perf_counter() - t0)
        tracker.close()
        health = ray.remote(num_cpus=0)(DataHealth).remote()
        ray.get(health.summary.remote())
        rtt = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ray.get(health.summary.remote())
            rtt.append(time.perf_counter() - t0)
        ray.kill(health)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"log_s": float(np.median(times)), "health_s": float(np.median(rtt))}
    print(f"  log_metrics (SQLite store) {res['log_s'] * 1e3:.1f} ms, data-health round trip "
          f"{res['health_s'] * 1e3:.2f} ms (medians of {repeats})", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# Ray Data: the per-block cost of the process that runs the stream
# ---------------------------------------------------------------------------------------------
def measure_stream(consumers, blocks: int, tasks: int = 2, own: bool = False) -> dict:
    """As the training stream: long-lived read tasks (one row each, `batch_size=1`) yield
    64-row blocks of 1 kB rows, the block size limit set so that each stays one block
    (`stream.block_bytes`' rule), consumed by n threads: through `streaming_split(n)` from
    `tasks` tasks, or (`own`, as the runs on GPUs or several nodes read now) as n streams of
    their own (`stream.per_worker`), each executed by its consumer, no coordinator between."""
    import ray

    from pipeline.data.stream import Slots, per_worker

    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = False
    ctx.target_max_block_size = BLOCK * 1024 * 3 // 4

    res = {}
    for n in consumers:
        slots = max(tasks, n) if own else tasks
        per = blocks // slots

        def make(batch, per=per):
            for _ in range(per):
                yield {"x": np.zeros((BLOCK, 1024), np.uint8)}

        ds = Slots(make, slots, 0.5, workers=n if own else 1).dataset()
        parts = ([p.iterator() for p in per_worker(ds, n)] if own else
                 ds.streaming_split(n, equal=False))
        got = [0] * n

        def eat(i: int, parts=parts, got=got):
            for _ in parts[i].iter_batches(batch_size=None, prefetch_batches=1):
                got[i] += 1

        wall = run_threads(eat, n)
        res[n] = {"blocks_s": sum(got) / wall}
        print(f"  {n} {'streams' if own else 'consumers'}: {sum(got)} blocks of {BLOCK} rows "
              f"in {wall:.1f} s = {sum(got) / wall:6.0f} blocks/s", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# Ray Tune's controller
# ---------------------------------------------------------------------------------------------
def measure_tune(trials) -> dict:
    from ray import tune

    def trainable(config):
        return {"score": config["x"]}

    res = {}
    for n in trials:
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.5}),
            param_space={"x": tune.grid_search(list(range(n)))},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="scale-tune-"),
                                      verbose=0))
        tuner.fit()
        wall = time.perf_counter() - t0
        res[n] = {"wall_s": wall}
        print(f"  {n:3d} no-op trials: {wall:5.1f} s", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# The model against real runs
# ---------------------------------------------------------------------------------------------
def measure_real(workers, steps: int = 100, every: int = 50) -> dict:
    """`jobs/pretrain.py --preset smoke --workers N` (synthetic data: one 2,048-sample read per
    epoch, global batch 64, 64-row blocks, a 256-sample shuffle buffer) with `data.trace_dir`:
    each worker's trace is what it trained, so what it sent at each checkpoint is exactly
    `compact` of its trace's lines since the last one (the loop's `_advance`). Against it, the
    model (`consumption`) with the same sizes."""
    from pipeline.train.config import apply_overrides, smoke

    res = {}
    for n in workers:
        tmp = Path(tempfile.mkdtemp(prefix="scale-real-"))
        try:
            cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--preset", "smoke",
                   "--workers", str(n), "--cpus-per-worker", f"{1 / n:g}", "--no-mlflow",
                   "--out", str(tmp / "runs"), "--name", f"scale{n}"]
            sets = [f"train.total_steps={steps}", f"checkpoint.every={every}",
                    f"train.log_every={every}", "probe.every=0",
                    f"data.trace_dir={tmp / 'trace'}"]
            cmd += [x for v in sets for x in ("--set", v)]
            import subprocess

            env = dict(os.environ, PYTHONPATH=str(ROOT))
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise SystemExit(f"the smoke run with {n} workers failed:\n{done.stderr[-2000:]}")
            wall = time.perf_counter() - t0
            sent, samples = [], 0
            for rank in range(n):
                rows = np.loadtxt(tmp / "trace" / f"rank{rank}.txt", dtype=np.int64, ndmin=2)
                rows = rows[rows[:, 0] > 0]
                mine = rows[(rows[:, 0] > steps - every) & (rows[:, 0] <= steps)][:, 1:]
                samples += len(mine)
                sent.append(compact(sample_ranges(*mine.T)).astype(np.int32))
            cfg = apply_overrides(smoke(), [f"scale.num_workers={n}"])
            from pipeline.train.loop import shuffle_buffer

            micro = cfg.micro_batch
            buffer = max(shuffle_buffer(cfg), 2 * micro)
            _, model, _ = consumption(n, every * cfg.train.global_batch_size, micro, buffer,
                                      block=cfg.data.block_rows,
                                      shard=cfg.data.synthetic_samples)
            predicted = [compact(sample_ranges(*a)).astype(np.int32) for a in model]
            res[n] = {"rows": sum(len(r) for r in sent),
                      "bytes": sum(len(pickle.dumps(r)) for r in sent),
                      "ids_bytes": samples * 24 + n * len(pickle.dumps(np.zeros((3, 0)))),
                      "model_rows": sum(len(r) for r in predicted),
                      "model_bytes": sum(len(pickle.dumps(r)) for r in predicted)}
            r = res[n]
            print(f"  {n} workers ({wall:.0f} s): checkpoint at step {steps}: gathered "
                  f"{r['rows']} rows = {r['bytes']:,} bytes (ids: {r['ids_bytes']:,}); model "
                  f"{r['model_rows']} rows = {r['model_bytes']:,} bytes", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# The projection
# ---------------------------------------------------------------------------------------------
def project(got: dict, samples: int) -> None:
    print("\nProjection: B/16 at 3,400 img/s per GPU, global batch 4,096 (a step at N GPUs = "
          "4,096 / (3,400 N) s), log every 50 steps, checkpoint every 2,000")
    print(f"{'':34s}" + "".join(f"{g:>14d}" for g in GPUS))
    print(f"{'a step (ms)':34s}" + "".join(f"{step_s(g) * 1e3:14.2f}" for g in GPUS))
    scale = CHECKPOINT_EVERY * GLOBAL_BATCH / samples   # simulated interval -> the preset's

    def row(label, per_step_s):
        cells = "".join(f"{c * 1e3:8.3f} {100 * c / step_s(g):4.1f}%"
                        for g, c in zip(GPUS, per_step_s, strict=True))
        print(f"{label:34s}{cells}")

    def show_mb(label, values):
        print(f"{label:34s}" + "".join(f"{v / 1e6:11.1f} MB" for v in values))

    if "position" in got:
        p = got["position"]
        ns = sorted(p)
        # Bytes: the rows scale with the interval, the pickle's ~150 bytes a worker do not.
        per = len(pickle.dumps(np.zeros((0, 4), np.int32)))
        a, b = fit(ns, [p[n]["old_bytes"] for n in ns], "1")
        show_mb("position: ids gathered", [a * scale for _ in GPUS])
        a, b = fit(ns, [p[n]["rows"] for n in ns], "N")
        new_bytes = [at("N", a, b, g) * scale * 16 + g * per for g in GPUS]
        show_mb("position: ranges gathered", new_bytes)
        a, b = fit(ns, [p[n]["json"] for n in ns], "N")
        show_mb("position: its JSON in the checkpoint", [at("N", a, b, g) * scale for g in GPUS])
        for key, label in (("old_s", "position: rank 0, ids"),
                           ("new_s", "position: rank 0, ranges")):
            a, b = fit(ns, [p[n][key] for n in ns], "N")
            per = [at("N", a, b, g) * scale for g in GPUS]
            print(f"{label + ' (s/checkpoint)':34s}" + "".join(f"{x:14.2f}" for x in per))
            row(f"{label} (per step)", [x / CHECKPOINT_EVERY for x in per])
        # Now rank 0 advances the position where the checkpoint is written (loop.PositionChain,
        # Ray's upload thread), not in the training loop.
        print(f"{'  now: in the upload thread':34s}" + "".join(f"{'0':>14s}" for _ in GPUS))
        # Moving the bytes to rank 0: assume 10 GB/s into one node.
        a, _ = fit(ns, [p[n]["old_bytes"] for n in ns], "1")
        row("position: gather at 10 GB/s, ids", [a * scale / 1e10 / CHECKPOINT_EVERY] * 4)
        row("position: gather, ranges", [x / 1e10 / CHECKPOINT_EVERY for x in new_bytes])
    if "dealer" in got:
        from pipeline.data.stream import dealing

        d = got["dealer"]
        need = [IMG_PER_GPU_S * g / SHARD for g in GPUS]
        calls = {k: max(v["calls_s"] for (kk, _), v in d.items() if kk == k) for k in (1, 16)}
        print(f"{'dealer, 1 read/call: need/capacity':34s}" +
              "".join(f"{100 * x / calls[1]:13.1f}%" for x in need))
        # Now: (k, dealers) from `dealing`, 4 read tasks per GPU, i21k's 14k shards an epoch.
        plans = [dealing(90 * I21K_SHARDS, I21K_SHARDS, min(4 * g, 4096)) for g in GPUS]
        print(f"{'  now: (reads/call, dealers)':34s}" +
              "".join(f"{f'({k}, {n})':>14s}" for k, n in plans))
        print(f"{'  now: need/capacity per dealer':34s}" +
              "".join(f"{100 * x / k / n / calls[1]:13.1f}%"
                      for x, (k, n) in zip(need, plans, strict=True)))
        # The data-health actor (one per run) heard every read twice: a verdict before it
        # (a round trip, like a dealer call) and the count after it. Now each read task
        # reports at most every `report_interval` (a rate capped at REPORTS_PER_S in all).
        from pipeline.data.health import REPORTS_PER_S, report_interval

        print(f"{'data health, 2 calls/read: need/cap':34s}" +
              "".join(f"{100 * 2 * x / calls[1]:13.1f}%" for x in need))
        slots = [min(4 * g, 4096) for g in GPUS]
        print(f"{'  now: s between reports per task':34s}" +
              "".join(f"{report_interval(n):14.2f}" for n in slots))
        print(f"{'  now: need/capacity':34s}" +
              "".join(f"{100 * min(x, n / report_interval(n)) / calls[1]:13.1f}%"
                      for x, n in zip(need, slots, strict=True)))
        assert all(n / report_interval(n) <= REPORTS_PER_S + 1e-9 for n in slots)
    if "listing" in got:
        ls = got["listing"]
        a, b = fit(sorted(ls), [ls[n]["local_s"] for n in sorted(ls)], "N")
        # Retention lists the run folder at every checkpoint, on rank 0, before it saves.
        row("listing at each checkpoint, local", [at("N", a, b, g) / CHECKPOINT_EVERY
                                                  for g in GPUS])
        row("listing at each checkpoint, S3", [-(-(KEEP + 1) * (2 * g + 4) // 1000) * S3_PAGE_S
                                               / CHECKPOINT_EVERY for g in GPUS])
        print(f"{'  now: in the upload thread':34s}" + "".join(f"{'0':>14s}" for _ in GPUS))
    if "metrics" in got:
        m = got["metrics"]
        row("metrics: log_batch, SQLite here", [m["log_s"] / LOG_EVERY] * len(GPUS))
        row(f"metrics: log_batch, {MLFLOW_RTT_S * 1e3:.0f} ms server",
            [MLFLOW_RTT_S / LOG_EVERY] * len(GPUS))
        row("metrics: data-health round trip", [m["health_s"] / LOG_EVERY] * len(GPUS))
        from pipeline.train.loop import FLUSH_EVERY_S

        # Now at most once per FLUSH_EVERY_S (or per log step, if that is longer).
        row(f"  now: log_batch once per {FLUSH_EVERY_S:g} s",
            [MLFLOW_RTT_S * step_s(g) / max(FLUSH_EVERY_S, LOG_EVERY * step_s(g))
             for g in GPUS])
    if "stream" in got:
        cap = max(v["blocks_s"] for v in got["stream"].values())
        need = [IMG_PER_GPU_S * g / BLOCK for g in GPUS]
        print(f"{'stream: blocks/s need/capacity':34s}" +
              "".join(f"{100 * x / cap:13.1f}%" for x in need))
    if "streams" in got:
        # Now: each worker executes its own stream (stream.per_worker). Its executor needs
        # a GPU's blocks whatever N, and the one-process figure bounds it from below.
        one = got["streams"][1]["blocks_s"]
        print(f"{'  now: per worker, need/capacity':34s}" +
              "".join(f"{100 * IMG_PER_GPU_S / BLOCK / one:13.1f}%" for _ in GPUS))
        if "dealer" in got:
            # What every executor still sends to one actor: Ray Data's stats (every 5 s)
            # and its autoscaling requests (every 10 s), fire and forget; capacity as a
            # dealer's (one small Python actor).
            small = max(v["calls_s"] for (k, _), v in got["dealer"].items() if k == 1)
            print(f"{'  now: stats + autoscaler actors':34s}" +
                  "".join(f"{100 * (g / 5 + g / 10) / small:13.1f}%" for g in GPUS))
    if "tune" in got:
        t = got["tune"]
        a, b = fit(sorted(t), [t[n]["wall_s"] for n in sorted(t)], "N")
        print(f"tune: {a:.1f} s fixed + {b:.2f} s per trial of controller time; the VTAB "
              f"sweep's 19 x (4 + 1) = 95 trials: {a + 95 * b:.0f} s per sweep")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("position", "dealer", "listing", "metrics",
                                                   "stream", "tune", "real"))
    ap.add_argument("--samples", type=int, default=1 << 19,
                    help="samples per simulated checkpoint interval (the preset: 8,192,000; "
                         "figures are scaled to it)")
    ap.add_argument("--seconds", type=float, default=1.5, help="per dealer measurement")
    args = ap.parse_args(argv)
    parts = args.only or ("position", "dealer", "listing", "metrics", "stream", "tune")
    got = {}
    t0 = time.perf_counter()
    if "real" in parts:
        print("real: smoke runs with 1, 2, 4 gloo workers, the checkpoint at step 100")
        got["real"] = measure_real((1, 2, 4))
    if "position" in parts:
        print(f"position: one checkpoint interval of {args.samples:,} samples, N workers")
        got["position"] = measure_position((1, 4, 16, 64, 256, 1024), args.samples)
    if "listing" in parts:
        print("listing: a run folder with the files of 4 checkpoints of N ranks")
        got["listing"] = measure_listing((8, 64, 256, 1024))
    if {"dealer", "metrics", "stream", "tune"} & set(parts):
        import ray

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            if "dealer" in parts:
                print("dealer: one ReadDealer actor, N threads calling it")
                got["dealer"] = measure_dealer((1, 4, 16), args.seconds)
            if "metrics" in parts:
                print("metrics: rank 0's blocking calls at a log step")
                got["metrics"] = measure_metrics(20)
            if "stream" in parts:
                print("stream: Ray Data blocks through streaming_split(N)")
                got["stream"] = measure_stream((1, 2, 4), 3000)
                print("stream: the same blocks, a stream per consumer (stream.per_worker)")
                got["streams"] = measure_stream((1, 2, 4), 3000, own=True)
            if "tune" in parts:
                print("tune: one controller, N no-op trials")
                got["tune"] = measure_tune((4, 16, 32))
        finally:
            ray.shutdown()
    project(got, args.samples)
    print(f"\n(bench took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
