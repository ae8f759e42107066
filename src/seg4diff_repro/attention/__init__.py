"""Recording (and, later, perturbing) the joint attention of MM-DiT transformers."""

from seg4diff_repro.attention.processors import ObservedJointAttnProcessor
from seg4diff_repro.attention.recorder import AttentionRecorder, joint_blocks

__all__ = ["AttentionRecorder", "ObservedJointAttnProcessor", "joint_blocks"]
