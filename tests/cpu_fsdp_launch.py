"""`netmorph` under FSDP2 on CPU processes (gloo), for the multi-process tests only.

accelerate 1.15 switches its state to FSDP only in the branch for GPU-type devices (MULTI_GPU, MULTI_XPU, … in
`AcceleratorState.__init__`, accelerate/state.py); CPU processes (MULTI_CPU, gloo) keep plain DDP and drop the FSDP
plugin. torch 2.13's `fully_shard` itself runs on CPU with gloo. This launcher makes the same switch for CPU
processes, then runs the netmorph CLI unchanged: everything after it — the Trainer, accelerate's
`fsdp2_prepare_model`, its sharded (torch.distributed.checkpoint) save and load — is the engines' own code.

    accelerate launch --multi_gpu --num_processes 2 tests/cpu_fsdp_launch.py train CONFIG
"""

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    # Every AcceleratorState() copies the process state (MULTI_CPU) back in, so the switch is made on every call.
    fsdp_plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init

if __name__ == "__main__":
    from netmorph.cli import main

    main()
