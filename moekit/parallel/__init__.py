"""Expert parallelism over torch.distributed: shard experts across ranks, exchange tokens all-to-all."""

from .data_parallel import share_balance_load
from .expert_parallel import (all_reduce_replicated_grads, apply_expert_parallel, expert_shard,
                              is_expert_parallel)
from .fsdp import (apply_fsdp_expert_parallel, fsdp_full_optimizer_state_dict, fsdp_full_state_dict,
                   load_fsdp_full_optimizer_state_dict, load_fsdp_full_state_dict)
from .state import (first_copy_rows, full_optimizer_state_dict, full_state_dict,
                    load_full_optimizer_state_dict, load_full_state_dict, load_sharded_state_dict,
                    sharded_state_dict)

__all__ = ["all_reduce_replicated_grads", "apply_expert_parallel", "apply_fsdp_expert_parallel",
           "expert_shard", "first_copy_rows", "fsdp_full_optimizer_state_dict", "fsdp_full_state_dict",
           "full_optimizer_state_dict", "full_state_dict", "is_expert_parallel",
           "load_fsdp_full_optimizer_state_dict", "load_fsdp_full_state_dict",
           "load_full_optimizer_state_dict", "load_full_state_dict", "load_sharded_state_dict",
           "sharded_state_dict", "share_balance_load"]
