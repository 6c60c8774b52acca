"""Token merging for diffusion transformers as pure, static-shape JAX functions.

SDTM (Structure-then-Detail Token Merging, CVPR 2025): SSM windows in the early steps, IDM in
the late ones, a cosine compression-ratio schedule, frequency priority; and ToMe for SD, the
baseline. Framework-agnostic: everything works on [B, N, C] arrays of a row-major token grid.

    plan = sdtm.ssm_plan(metric, 96, grid=(16, 16))   # metric (B, 256, C)
    y = sdtm.merge(plan, x)                            # (B, 160, C)
    x_back = sdtm.unmerge(plan, f(y))                  # (B, 256, C)

    for phase in sdtm.schedule(sdtm.SDTMConfig(), steps=50, num_tokens=256):
        ...  # phase.merger.build(metric, state, grid=(16, 16)) inside each block
"""

from sdtm.config import SDTMConfig, ToMeConfig
from sdtm.frequency import frequency_priority, update_counter
from sdtm.idm import IDMMerger, idm_plan
from sdtm.merger import BatchParallel, BlockMerger, MergeState, NoMerger, init_state
from sdtm.ops import MergePlan, identity_plan, merge, plan_from_parents, unmerge
from sdtm.schedule import Phase, compression_ratio, schedule, step_merge_counts
from sdtm.ssm import SSMMerger, ssm_plan
from sdtm.tome import ToMeMerger, tome_plan

__all__ = [
    "BlockMerger",
    "IDMMerger",
    "MergePlan",
    "MergeState",
    "NoMerger",
    "BatchParallel",
    "Phase",
    "SDTMConfig",
    "SSMMerger",
    "ToMeConfig",
    "ToMeMerger",
    "compression_ratio",
    "frequency_priority",
    "identity_plan",
    "idm_plan",
    "init_state",
    "merge",
    "plan_from_parents",
    "schedule",
    "ssm_plan",
    "step_merge_counts",
    "tome_plan",
    "unmerge",
    "update_counter",
]
