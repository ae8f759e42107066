"""Recording and perturbing the joint attention of MM-DiT transformers (SD3, SD3.5, Flux).

The names below are imported on first use, so that light modules of this package (the cache format)
load without torch: the Snakefile reads them when it builds the DAG.
"""

from importlib import import_module

_EXPORTS = {
    "AttentionHooks": "seg4diff_repro.attention.joint",
    "JointLayout": "seg4diff_repro.attention.joint",
    "AttentionRecorder": "seg4diff_repro.attention.recorder",
    "HookSwap": "seg4diff_repro.attention.recorder",
    "RecordingTooLarge": "seg4diff_repro.attention.recorder",
    "backend_for": "seg4diff_repro.attention.backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
