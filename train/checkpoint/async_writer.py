"""(split from train/checkpoint/saver.py)"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from train.config import ConfigError, RunConfig
from train.worker import failpoints


class AsyncWriter:
    """checkpoint.async_save under FSDP2: what ``accelerator.save_state`` writes, in its layout,
    with the model and optimizer written in the background.

    accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer`` write {"model": get_model_state_dict}
    to ``pytorch_model_fsdp_<i>/`` and {"optimizer": get_optimizer_state_dict} to ``optimizer_<i>/``
    with torch.distributed.checkpoint (DCP). The same state dicts, taken with the same options, go
    to ``dcp.async_save`` here, whose stager (the FileSystemWriter) copies them to CPU memory before
    it returns: training may change the parameters right after. The rest (scheduler, sampler, RNG
    states) is small and written at once by accelerate's own ``save_accelerator_state``. So
    ``load_state`` and the portable reader (train/checkpoint/portable.py) read the result unchanged.

    Each background write coordinates over a gloo process group of its own, created here once on
    every rank: on the default group its collectives would interleave with training's, and the
    model's and the optimizer's writes run in two threads at once.
    """

    def __init__(self, cfg: RunConfig, accelerator):
        from accelerate.utils import DistributedType
        from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if (accelerator.distributed_type != DistributedType.FSDP or plugin is None or plugin.fsdp_version != 2
                or plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT or not dist.is_initialized()):
            raise ConfigError("ASYNC_SAVE=true needs FSDP2 with sharded state dicts in a process group "
                              "(STRATEGY fsdp or fsdp-offload)")
        self.acc = accelerator
        timeout = timedelta(seconds=cfg.launch.timeout_s)
        count = len(accelerator._models) + len(accelerator._optimizers)
        self.groups = [dist.new_group(backend="gloo", timeout=timeout) for _ in range(count)]

    def start(self, tmp: Path) -> list:
        """Write ``tmp`` as ``save_state`` would; returns the background writes' futures."""
        import torch.distributed.checkpoint as dcp
        from accelerate.checkpointing import save_accelerator_state, save_custom_state
        from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
        from accelerate.utils.fsdp_utils import _prepare_sd_options
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        acc = self.acc
        options = _prepare_sd_options(acc.state.fsdp_plugin)
        parts = [(f"{FSDP_MODEL_NAME}_{i}", {"model": get_model_state_dict(m, options=options)})
                 for i, m in enumerate(acc._models)]
        parts += [(f"{OPTIMIZER_NAME}_{i}", {"optimizer": get_optimizer_state_dict(acc._models[i], opt, options=options)})
                  for i, opt in enumerate(acc._optimizers)]
        writes = []
        for (name, state_dict), group in zip(parts, self.groups):
            (tmp / name).mkdir(parents=True, exist_ok=True)
            writes.append(dcp.async_save(state_dict, storage_writer=dcp.FileSystemWriter(str(tmp / name)),
                                         planner=_save_planner(), process_group=group))
        # What save_state writes after the FSDP model and optimizer, the same way.
        for hook in acc._save_model_state_pre_hook.values():
            hook(acc._models, [], str(tmp))
        each_node = acc.project_configuration.save_on_each_node
        save_accelerator_state(str(tmp), [], [], acc._schedulers, acc._dataloaders, acc.state.process_index,
                               acc.step, acc.scaler, save_on_each_node=each_node)
        for i, obj in enumerate(acc._custom_objects):
            save_custom_state(obj, str(tmp), i, save_on_each_node=each_node)
        acc.project_configuration.iteration += 1
        return writes


def _save_planner():
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    delay = failpoints.async_write_delay()
    if not delay:
        return DefaultSavePlanner()

    class SlowPlanner(DefaultSavePlanner):  # a slow disk: the write starts late, training goes on
        def set_up_planner(self, *args, **kwargs):
            time.sleep(delay)
            super().set_up_planner(*args, **kwargs)

    return SlowPlanner()
