"""torch.distributed for the Ray Train workers, set up without importing torch in the command's
driver or in Ray Train's controller.

Ray's `TorchTrainer` carries a `TorchConfig` whose module imports torch at its top, and the
controller unpickles it: every run paid torch's import (~1.2 s, 2 cores) in the driver and
again in the controller, both on the way to the first step, though neither touches a tensor.
`TorchBackend` does what Ray 2.60's `ray.train.torch.config._TorchBackend` does for a CPU or
GPU worker group, calling Ray's own worker-side functions (imported there, where torch is
loaded anyway):

- on start: rank 0's address and a free port as MASTER_ADDR / MASTER_PORT on every worker,
  torch's LOCAL_RANK / RANK / WORLD_SIZE variables, then `init_process_group` (gloo on CPUs,
  NCCL on GPUs, env:// rendezvous) on all workers at once;
- on shutdown: the process group destroyed (more than one worker) and the CUDA cache emptied;
- around the training function: the worker's CUDA device made current (Ray's
  `TorchConfigContextManager`).

`trainer_base()` is Ray Train's `DataParallelTrainer` given this backend: TorchTrainer less its
torch import (its only other work is choosing gloo or NCCL, done here too).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

log = logging.getLogger("pipeline.train")


@dataclass
class TorchBackend(BackendConfig):
    """`TorchConfig` for CPU and GPU worker groups, torch-free where it is unpickled."""

    backend: str = "gloo"          # "nccl" for GPUs
    timeout_s: int = 1800          # the process group's collectives (torch's default)

    @property
    def backend_cls(self):
        return _Backend

    @property
    def train_func_context(self):
        return _CudaDevice

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class _Backend(Backend):
    share_cuda_visible_devices = True        # as Ray's: NCCL needs every local GPU visible

    def on_start(self, worker_group, backend_config: TorchBackend) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_env, address=address, port=port)
        worker_group.execute(_set_rank_env)
        ray.get([worker_group.execute_single_async(
            rank, _init_process_group, backend=backend_config.backend, world_rank=rank,
            world_size=len(worker_group), timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: TorchBackend) -> None:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_shutdown, destroy=len(worker_group) > 1)
        timeout = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                       DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout)
        except GetTimeoutError:
            log.warning("torch's process group did not shut down within %.0f s", timeout)


# On the workers (each imports Ray's torch module there, where torch is loaded anyway).
def _set_env(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)


def _set_rank_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _init_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(init_method="env://", **kwargs)


def _shutdown(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


class _CudaDevice:
    """Ray's `TorchConfigContextManager`: the worker's CUDA device made current."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


def trainer_base():
    """Ray Train's `DataParallelTrainer` on `TorchBackend` (gloo, or NCCL with GPUs): the
    TorchTrainer of Ray 2.60 without its torch import."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class TorchTrainer(DataParallelTrainer):
        def __init__(self, train_loop_per_worker, *, scaling_config, **kwargs):
            backend = TorchBackend("nccl" if scaling_config.use_gpu else "gloo")
            super().__init__(train_loop_per_worker, backend_config=backend,
                             scaling_config=scaling_config, **kwargs)

    return TorchTrainer
