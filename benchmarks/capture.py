"""Cost of attention capture at the real model sizes (random weights, bf16, 1024²).

Prints a Markdown table: time and extra peak memory of a plain forward, of `AttentionRecorder` at one
layer / all joint layers (head mean from the fused Triton kernel and from torch ops, and per head), and of the
official code's naive method (full softmaxed joint matrix per head, then sliced), each as a ratio to the
plain forward and to the naive method at the same layers. Variants are timed in interleaved rounds (so clock or
allocator drift hits all alike) at batch 1, where a diffusers forward is partly bound by Python's kernel
launches, and at batch 4, where the GPU is the bottleneck. Also checks that outputs with the recorder are bit-identical.

    python benchmarks/capture.py --models sd3 flux --out benchmarks/capture_results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from seg4diff_repro.attention import AttentionHooks, AttentionRecorder, HookSwap, RecordingTooLarge
from seg4diff_repro.attention.joint import JointLayout

# Transformer configs of the released checkpoints (their config.json), built with random weights.
CONFIGS = {
    "sd3": dict(
        cls="SD3Transformer2DModel",
        config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        n_text=154, layer=9,
    ),
    "sd35": dict(
        cls="SD3Transformer2DModel",
        config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(13))),
        n_text=154, layer=9,
    ),
    "flux": dict(
        cls="FluxTransformer2DModel",
        config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        n_text=512, layer=12,
    ),
}


class NaiveFullMatrix(HookSwap, AttentionHooks):
    """The official code's capture: softmax of the full joint score matrix per head, sliced, head mean."""

    def __init__(self, transformer, layers):
        HookSwap.__init__(self, transformer, layers, self)
        self.i2t = {}

    @torch.no_grad()
    def attend(self, query, key, value, layout: JointLayout, layer: int):
        out = AttentionHooks.attend(self, query, key, value, layout, layer)
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        probabilities = torch.softmax(scores.float(), dim=-1)
        self.i2t[layer] = probabilities[:, :, layout.image, layout.text].mean(dim=1, keepdim=True)
        return out


def build(name: str):
    import diffusers

    spec = CONFIGS[name]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = getattr(diffusers, spec["cls"])(**spec["config"]).eval()
    torch.set_default_dtype(torch.float32)
    return model, spec


def model_inputs(name: str, spec: dict, batch: int) -> dict:
    generator = torch.Generator("cuda").manual_seed(1)
    bf16 = dict(device="cuda", dtype=torch.bfloat16, generator=generator)
    if name == "flux":
        ids = torch.zeros(64, 64, 3, device="cuda")
        ids[..., 1] = torch.arange(64, device="cuda")[:, None]
        ids[..., 2] = torch.arange(64, device="cuda")[None, :]
        return dict(
            hidden_states=torch.randn(batch, 4096, 64, **bf16),
            encoder_hidden_states=torch.randn(batch, spec["n_text"], 4096, **bf16),
            pooled_projections=torch.randn(batch, 768, **bf16),
            timestep=torch.full((batch,), 0.23, device="cuda", dtype=torch.bfloat16),
            guidance=torch.full((batch,), 3.5, device="cuda", dtype=torch.bfloat16),
            img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(spec["n_text"], 3, device="cuda"),
            return_dict=False,
        )
    return dict(
        hidden_states=torch.randn(batch, 16, 128, 128, **bf16),
        encoder_hidden_states=torch.randn(batch, spec["n_text"], 4096, **bf16),
        pooled_projections=torch.randn(batch, 2048, **bf16),
        timestep=torch.full((batch,), 515.0, device="cuda"),
        return_dict=False,
    )


def time_once(model, inputs, context_factory) -> tuple[float, int]:
    """Milliseconds and peak allocated bytes of one forward inside a fresh context."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad(), context_factory():
        start.record()
        model(**inputs)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated()


def measure_interleaved(model, inputs, variants: dict, rounds: int) -> dict[str, tuple[float, int]]:
    """Median time and peak memory per variant, the variants taking turns in every round."""
    times = {label: [] for label in variants}
    peaks, refused = {}, {}
    for round_index in range(rounds + 2):  # two warm-up rounds
        for label, factory in variants.items():
            if label in refused:
                continue
            try:
                ms, peak = time_once(model, inputs, factory)
            except RecordingTooLarge as error:  # the memory guard, working as intended
                refused[label] = f"refused by the memory guard before the forward pass: {error}"
                continue
            except torch.OutOfMemoryError:  # the naive method at Flux size and batch 4
                torch.cuda.empty_cache()
                refused[label] = "out of GPU memory"
                continue
            if round_index >= 2:
                times[label].append(ms)
                peaks[label] = peak
    return {
        label: (statistics.median(times[label]), peaks[label]) if label not in refused else (None, refused[label])
        for label in variants
    }


class Plain:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def outputs_bit_identical(model, inputs, recorder_factory) -> bool:
    with torch.no_grad():
        stock = model(**inputs)[0]
        with recorder_factory():
            recorded = model(**inputs)[0]
    return torch.equal(stock, recorded)


def run(name: str, batch: int, rounds: int) -> list[dict]:
    model, spec = build(name)
    inputs = model_inputs(name, spec, batch)
    n_layers = len(AttentionRecorder(model).layers)
    one = [spec["layer"]]
    variants = {
        "plain forward": Plain,
        f"stock attention through our processors, all {n_layers} layers": lambda: HookSwap(model, None, AttentionHooks()),
        f"I2T head-mean, layer {spec['layer']}": lambda: AttentionRecorder(model, one, heads="mean"),
        f"I2T head-mean, all {n_layers} joint layers": lambda: AttentionRecorder(model, None, heads="mean"),
        f"I2T head-mean, all {n_layers} joint layers, torch ops (not fused)":
            lambda: AttentionRecorder(model, None, heads="mean", fused=False),
        f"I2T per head, all {n_layers} joint layers": lambda: AttentionRecorder(model, None, heads=None),
        f"naive full matrix, layer {spec['layer']}": lambda: NaiveFullMatrix(model, one),
        f"naive full matrix, all {n_layers} joint layers": lambda: NaiveFullMatrix(model, None),
    }
    measured = measure_interleaved(model, inputs, variants, rounds)
    base_ms, base_peak = measured["plain forward"]
    naive_one = measured[f"naive full matrix, layer {spec['layer']}"][0]
    naive_all = measured[f"naive full matrix, all {n_layers} joint layers"][0]  # None if it ran out of memory
    rows = []
    for label, (ms, peak) in measured.items():
        if ms is None:
            rows.append({"model": name, "batch": batch, "variant": label, "ms": None, "note": peak})
            continue
        naive = naive_one if label.endswith(f"layer {spec['layer']}") else naive_all if "joint layers" in label else None
        rows.append({
            "model": name, "batch": batch, "variant": label, "ms": ms, "peak_bytes": peak,
            "x_plain": ms / base_ms, "x_naive": ms / naive if naive else None,
            "extra_peak_vs_plain": (peak - base_peak) / base_peak,
        })
    rows[0]["bit_identical"] = outputs_bit_identical(model, inputs, lambda: AttentionRecorder(model, None, heads="mean"))
    model = None  # the variants' closures hold the name: drop the weights before emptying the cache
    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"Device: {device}; torch {torch.__version__}; bf16, 1024² (4096 image tokens), random weights; "
        "median of interleaved rounds.",
        "",
        "| model | batch | variant | ms (median) | × plain | × naive | extra peak memory vs plain |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["ms"] is None:
            lines.append(f"| {row['model']} | {row['batch']} | {row['variant']} | {row['note'].split(':')[0]} | | | |")
            continue
        naive = f"{row['x_naive']:.3f}" if row.get("x_naive") else ""
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['variant']} | {row['ms']:.2f} | {row['x_plain']:.3f} | {naive} | "
            f"{100 * row['extra_peak_vs_plain']:+.1f}% |"
        )
    identical = {(row["model"], row["batch"]): row["bit_identical"] for row in rows if "bit_identical" in row}
    lines += ["", f"Final transformer outputs bit-identical with the recorder on (I2T head-mean at all joint layers): {identical}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd3", "sd35", "flux"], choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/capture.py needs a CUDA GPU")
    rows = []
    for name in args.models:
        for batch in args.batches:
            rows += run(name, batch, args.rounds)
            if args.out:  # after every model, so that a later failure keeps what was measured
                args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    print(markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
