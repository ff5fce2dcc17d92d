"""Expert parallelism over torch.distributed: shard experts across ranks, exchange tokens all-to-all."""

from .expert_parallel import (all_reduce_replicated_grads, apply_expert_parallel, expert_shard,
                              is_expert_parallel)
from .data_parallel import share_balance_load
from .fsdp import apply_fsdp_expert_parallel
from .state import (first_copy_rows, full_optimizer_state_dict, full_state_dict,
                    load_full_optimizer_state_dict, load_full_state_dict, load_sharded_state_dict,
                    sharded_state_dict)

__all__ = ["apply_expert_parallel", "apply_fsdp_expert_parallel", "expert_shard", "is_expert_parallel", "all_reduce_replicated_grads",
           "share_balance_load",
           "full_state_dict", "load_full_state_dict", "full_optimizer_state_dict",
           "load_full_optimizer_state_dict", "sharded_state_dict", "load_sharded_state_dict",
           "first_copy_rows"]
