"""``kl-ae train`` under Accelerate's FSDP2 on CPU processes (gloo), for tests only.

Accelerate 1.15 turns an FSDP config into FSDP only on accelerators (``AcceleratorState`` checks
for MULTI_GPU, MULTI_XPU, ...); with ``ACCELERATE_USE_CPU=1`` it silently runs DDP. FSDP2 itself
(``fully_shard``, DTensor, distributed checkpoints) works over gloo, so this entry point sets the
distributed type to FSDP right after the Accelerator is built, then runs the normal CLI. Launch it
with ``ACCELERATE_USE_CPU=1 accelerate launch --config_file <an FSDP2 config> tests/fsdp_cpu_train.py
train ...``.
"""

import sys

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import kl_ae.trainer
from kl_ae.cli import main


class CpuFsdpAccelerator(Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.state.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: a later AcceleratorState() re-reads PartialState's.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables


kl_ae.trainer.Accelerator = CpuFsdpAccelerator

if __name__ == "__main__":
    sys.exit(main())
