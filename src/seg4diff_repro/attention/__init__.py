"""Recording and perturbing the joint attention of MM-DiT transformers (SD3, SD3.5, Flux)."""

from seg4diff_repro.attention.backends import backend_for
from seg4diff_repro.attention.joint import AttentionHooks, JointLayout
from seg4diff_repro.attention.recorder import AttentionRecorder, HookSwap, RecordingTooLarge

__all__ = ["AttentionHooks", "AttentionRecorder", "HookSwap", "JointLayout", "RecordingTooLarge", "backend_for"]
