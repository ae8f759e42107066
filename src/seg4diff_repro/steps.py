"""Where the paper's "t = k" lies on a model's sampling schedule (torch-free: the CLI and config checks use it).

``step_convention``, recorded in every output of generation-time recording:

* "official" (the default): "t = k" is ``timesteps[-k]`` of the model's own schedule, schedule index
  ``num_steps − k``, as the official code indexes the timestep of every backbone (``NOISE_STEPS``,
  docs/method.md#noising-and-timesteps; its value-norm code is not released, docs/method.md#value-norms) and as
  `models.common.noising_at_step` does for segmentation. On SD3's 28 steps t = 28 is the first step (σ = 1) and
  t = 8 is index 20; on Flux's 50 steps t = 28 is index 22 and t = 8 index 42 (the segmentation's t = 8).
* "paper": the paper's "t = k of 28" (appendix A.1, §3.3) as a position along SD3's 28-step schedule, placed at
  the same fraction of the model's schedule: index ``round((28 − k) · num_steps / 28)``, halves up. t = 28 is
  then the first step on every schedule (the paper's value norms "at t = 8 and t = 28", §3.3), and on Flux's
  50 steps t = 8 is index 36. On 28 steps both conventions agree.
"""

from __future__ import annotations

import math

__all__ = ["PAPER_STEPS", "STEP_CONVENTIONS", "step_index"]

STEP_CONVENTIONS = ("official", "paper")
PAPER_STEPS = 28  # the schedule the paper's "t = k of 28" counts on (SD3's)


def step_index(k: int, num_steps: int, convention: str = "official") -> int:
    """Denoising step (= transformer call) of "t = k" in a ``num_steps`` schedule, under ``convention``.

    "official": ``num_steps − k`` (``timesteps[-k]``); "paper": ``round((28 − k) · num_steps / 28)``, halves up.
    """
    if convention == "official":
        if not 1 <= k <= num_steps:
            raise ValueError(f"timestep k={k} out of range: use 1..{num_steps} (k steps before the end)")
        return num_steps - k
    if convention == "paper":
        if not 1 <= k <= PAPER_STEPS:
            raise ValueError(f"timestep k={k} out of range for step_convention 'paper': use 1..{PAPER_STEPS} "
                             f"(the paper's t = k of {PAPER_STEPS})")
        return math.floor((PAPER_STEPS - k) * num_steps / PAPER_STEPS + 0.5)
    raise ValueError(f"step_convention={convention!r}: choose from {STEP_CONVENTIONS}")
