"""Value-norm statistics of generation (docs/method.md#value-norms; appendix Figs. 6, 9, 15).

For each analysis prompt the model generates with its stock pipeline; at each "t = k" the conditional
branch's value features of every layer are recorded, and the mean L2 norm over a token group is taken:

* ``image``: the image tokens;
* ``text``: the 77 CLIP positions (SD3 / SD3.5; the zero T5 block left out [assumption]) or the 77 T5
  positions (Flux);
* ``prompt``: the prompt's own tokens, padding left out (CLIP: <sos> … <eos> included [assumption];
  T5: the tokens and </s>).

Per head the norm is that of the head's slice (Fig. 15); per layer that of the whole value vector, all
heads concatenated (Figs. 6, 9). The tables average over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
from seg4diff_repro.progress import progress

from seg4diff_repro.attention.during_generation import block_kind, generate_and_record

if TYPE_CHECKING:
    from seg4diff_repro.models.flux import FluxAdapter
    from seg4diff_repro.models.sd3 import SD3Adapter

# Token groups of the value norms (docs/method.md#value-norms): image tokens, the 77 text positions, the prompt's
# own tokens.
GROUPS = ("image", "text", "prompt")


def value_norm_statistics(
    adapter: SD3Adapter | FluxAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    timesteps: Sequence[int],
    num_steps: int,
    cfg: float,
    step_convention: str = "official",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per (k, layer, head), per (k, layer)) mean value norms over ``prompts``, one seed per prompt.

    ``step_convention`` places "t = k" on the schedule (`seg4diff_repro.steps.step_index`); each row records it
    with the schedule index and σ.
    """
    head_rows, layer_rows = [], []
    for prompt, seed in progress(list(zip(prompts, seeds, strict=True)), desc="value norms", unit="prompt"):
        generated = generate_and_record(
            adapter, prompt, seed, timesteps, num_steps, cfg=cfg, layers=None, record=("value_norms",), decode=False,
            step_convention=step_convention,
        )
        for k, recording in generated.recordings.items():
            noising = generated.noising[k]
            where = {"timestep_k": k, "step_index": noising.index, "sigma": noising.sigma}
            for layer, norms in recording.value_norms.items():
                block = block_kind(adapter.transformer, layer)
                for head in range(norms["image"].shape[1]):
                    head_rows.append({**where, "layer": layer, "block": block, "head": head,
                                      **{group: float(norms[group][0, head]) for group in GROUPS}})
                layer_rows.append({**where, "layer": layer, "block": block,
                                   **{group: float(norms[f"{group}_all_heads"][0]) for group in GROUPS}})
    keys_head = ["timestep_k", "step_index", "sigma", "layer", "block", "head"]
    per_head = pd.DataFrame(head_rows).groupby(keys_head, sort=True)[list(GROUPS)].mean().reset_index()
    per_layer = pd.DataFrame(layer_rows).groupby(keys_head[:-1], sort=True)[list(GROUPS)].mean().reset_index()
    for table in (per_head, per_layer):
        table["n_prompts"] = len(prompts)
        table["step_convention"] = step_convention
    return per_head, per_layer
