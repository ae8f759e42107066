"""Per-image cost of the extraction stage at SD3-medium's real size (random weights, fp16, 1024²).

Writes an SD3-medium-sized pipeline with random weights (the released configs of the transformer,
VAE and both CLIP text encoders; speed does not depend on the weights) through `save_pretrained`,
then runs the pipeline's own `extract_attention` over a generated dataset, and reports the
seconds per image, the extrapolation to VOC val (1449 images) and the cache size per image.

It also times the per-(layer, head) scoring of appendix Fig. 4 (`segmentation/heads.py`): every head of
every layer recorded, turned into a label map on the GPU and counted into its confusion matrix, with
background as a class as on VOC21.

    python benchmarks/extraction.py --images 32 --out benchmarks/extraction_results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
from seg4diff_repro.datasets import generate_toy_shapes
from seg4diff_repro.segmentation.heads import score_heads

VOC_VAL_IMAGES = 1449


def write_sd3_medium_sized_pipeline(out_dir: Path) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from seg4diff_repro.models.clip_tokenizer import build_sd3_tokenizers

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5305, sample_size=1024,
    )
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
        hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
    ))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
        hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
    ))
    tokenizer, tokenizer_2 = build_sd3_tokenizers(out_dir.parent / "tokenizers")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.to(torch.float16).save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/extraction.py needs a CUDA GPU")
    work = Path(tempfile.mkdtemp())
    write_sd3_medium_sized_pipeline(work / "sd3_medium_random")
    # 512×384 images, like VOC's, with 1–3 objects each (prompt lengths like VOC's oracle prompts).
    generate_toy_shapes(work / "dataset", n_train=1, n_val=args.images, image_size=512, seed=0)
    settings = ExtractionSettings(
        model="sd3_medium_random", dataset="generated", backbone="sd3", source=str(work / "sd3_medium_random"), dtype="float16",
        timestep=8, num_steps=28, layers=None, seed=0, short_side=640, resize="stretch", prompt="oracle",
        background_name="background", split="val", background="drop", limit=None,
    )
    rows = []
    for layers, label in ((None, "all 24 layers"), ((9,), "layer 9")):
        cache = work / f"cache_{len(layers or range(24))}"
        run = ExtractionSettings(**{**settings.__dict__, "layers": layers})
        # Warm-up on 2 images (model load, kernels), then the timed run over the rest.
        extract_attention(
            ExtractionSettings(**{**run.__dict__, "limit": 2}), work / "dataset", work / "warmup", device="cuda",
            batch_size=args.batch_size,
        )
        torch.cuda.synchronize()
        start = time.perf_counter()
        extract_attention(run, work / "dataset", cache, device="cuda", batch_size=args.batch_size)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in cache.glob("*.npz"))
        rows.append({
            "layers": label, "images": args.images, "seconds": seconds, "seconds_per_image": seconds / args.images,
            "voc_val_minutes": seconds / args.images * VOC_VAL_IMAGES / 60,
            "cache_mb_per_image": cache_bytes / args.images / 1e6,
        })
    # Fig. 4: all 24 x 24 heads scored while streaming, background as a class (VOC21's protocol).
    heads = ExtractionSettings(**{**settings.__dict__, "background": "last"})
    score_heads(ExtractionSettings(**{**heads.__dict__, "limit": 2}), work / "dataset", work / "heads_warmup",
                device="cuda", batch_size=args.batch_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    score_heads(heads, work / "dataset", work / "heads", device="cuda", batch_size=args.batch_size)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows.append({
        "layers": "Fig. 4: every head of all 24 layers, scored while streaming", "images": args.images,
        "seconds": seconds, "seconds_per_image": seconds / args.images,
        "voc_val_minutes": seconds / args.images * VOC_VAL_IMAGES / 60,
        "cache_mb_per_image": sum(p.stat().st_size for p in (work / "heads").rglob("*.npz")) / args.images / 1e6,
    })
    device = torch.cuda.get_device_name()
    print(f"Device: {device}; SD3-medium-sized pipeline with random weights, fp16, batch {args.batch_size}; "
          "the time includes model loading (excluded: warm-up), reading and resizing images, VAE, text encoders, "
          "the forward pass with the recorder, and writing the cache.")
    print("| layers recorded | s / image (incl. load) | VOC val (1449) extrapolated, min | on disk MB / image |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['layers']} | {row['seconds_per_image']:.3f} | {row['voc_val_minutes']:.1f} | "
              f"{row['cache_mb_per_image']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
