"""MAGNET training: flow matching plus a mask loss on the expert layer's pre-softmax I2T scores, with a LoRA.

One iteration (docs/method.md#magnet): images → clean VAE latents z; a logit-normal timestep on the
1000-step flow-matching schedule; x_t = (1 − σ)z + σε; one transformer forward with the supervised layer's
image→text scores kept (``I2TLogitsTap``); the loss 1.0·flow matching + 0.1·focal + 0.2·dice over the
matched (prediction, mask) pairs; AdamW on the LoRA (and the conv head), warm-up then cosine, the whole
model's gradient norm clipped. Each iteration draws its images, augmentations, timesteps and noise from
generators seeded by (seed, iteration), and a checkpoint holds everything else that changes (weights,
optimiser, schedule, loss scaler), so a run killed and resumed from its last checkpoint computes what an
uninterrupted run computes.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from seg4diff_repro.atomic import atomic_write_bytes, atomic_write_json
from seg4diff_repro.attention.logits_tap import I2TLogitsTap
from seg4diff_repro.magnet.lora import (
    LORA_TARGETS,
    AttentionScoreHead,
    add_lora,
    load_lora_state,
    lora_state_dict,
    save_adapter,
)
from seg4diff_repro.magnet.losses import flow_matching_loss, mask_losses, total_loss
from seg4diff_repro.magnet.matching import class_token_maps, classes_in_prompt, hungarian_match
from seg4diff_repro.models.common import encode_normalised_latents
from seg4diff_repro.progress import progress

if TYPE_CHECKING:
    from seg4diff_repro.magnet.data import MaskExample

CHECKPOINT_PATTERN = "iter_{:06d}.pt"
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnetRecipe:
    """Every setting of a MAGNET run; the defaults are the official trainer's (docs/method.md#magnet)."""

    protocol: Literal["coco", "sa1b"]
    layer: int = 9
    iterations: int = 3000
    batch_size: int = 4  # per step; the official 2-GPU runs take 8 (COCO) or 4 (SA-1B) images a step
    # The official config stores 2 but its trainer never accumulates: 1 reproduces what ran, 2 the paper's batch.
    gradient_accumulation: int = 1
    lora_rank: int = 16
    lora_alpha: int = 16
    conv_head: bool = True  # trained with the LoRA in the released configs, never used at evaluation
    lr_lora: float = 1e-5
    lr_head: float = 1e-4
    weight_decay: float = 1e-4
    warmup_iterations: int = 500
    warmup_factor: float = 0.01
    clip_grad_norm: float = 0.01
    focal_p_t_from: Literal["logit", "probability"] = "logit"  # "logit": the official p_t from the raw score
    # "raw": the official pre-softmax scores as mask logits; "normalized": the paper's text, each map min-max
    # scaled over the image (the official att2mask, whose call the trainer has commented out).
    mask_logits: Literal["raw", "normalized"] = "raw"
    timestep_std: float = 0.5
    train_timesteps: int = 1000
    shift: float = 3.0
    mixed_precision: bool = True  # fp16 autocast with a loss scaler, as the official (CUDA only)
    checkpoint_every: int = 250
    checkpoint_policy: Literal["last", "best"] = "last"
    seed: int = 0
    scaling: str = ""  # what was scaled from the official recipe, and why

    def __post_init__(self) -> None:
        choices = {"protocol": ("coco", "sa1b"), "focal_p_t_from": ("logit", "probability"),
                   "mask_logits": ("raw", "normalized"),
                   "checkpoint_policy": ("last", "best")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MAGNET recipe: {name}={getattr(self, name)!r}; use one of {allowed}")
        for name in ("iterations", "batch_size", "gradient_accumulation", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"MAGNET recipe: {name} must be at least 1, not {getattr(self, name)}")


class TrainingSet(Protocol):
    """What the trainer reads: examples drawn with a generator the trainer seeds (magnet/data.py)."""

    def __len__(self) -> int: ...

    def example(self, index: int, generator: torch.Generator) -> MaskExample: ...


def iteration_generator(seed: int, iteration: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) of one iteration: independent of everything run before it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 10_007 + stream)


def example_index(seed: int, slot: int, n_examples: int) -> int:
    """The example in ``slot`` of an endless sequence of seeded permutations (one per pass over the data)."""
    epoch, position = divmod(slot, n_examples)
    return int(torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[position])


def batch_indices(seed: int, iteration: int, micro_step: int, batch_size: int, accumulation: int,
                  n_examples: int) -> list[int]:
    """The examples of one micro-batch: consecutive slots of the sequence of ``example_index``."""
    first = (iteration * accumulation + micro_step) * batch_size
    return [example_index(seed, slot, n_examples) for slot in range(first, first + batch_size)]


def learning_rate_factor(iteration: int, recipe: MagnetRecipe) -> float:
    """detectron2's WarmupCosineLR: linear warm-up from ``warmup_factor``, times a half cosine over the run."""
    cosine = 0.5 * (1 + math.cos(math.pi * iteration / recipe.iterations))
    if iteration >= recipe.warmup_iterations:
        return cosine
    alpha = iteration / recipe.warmup_iterations
    return cosine * (recipe.warmup_factor * (1 - alpha) + alpha)


class ScheduledExamples(torch.utils.data.Dataset):
    """Example k of a run: slot k of the sequence of micro-batches, a function of (seed, k) alone, so that
    loader workers can prepare examples ahead in any process and a resumed run reads the same ones."""

    def __init__(self, training_set: TrainingSet, recipe: MagnetRecipe):
        self.training_set, self.recipe = training_set, recipe

    def __len__(self) -> int:
        return self.recipe.iterations * self.recipe.gradient_accumulation * self.recipe.batch_size

    def __getitem__(self, k: int) -> MaskExample:
        recipe = self.recipe
        iteration, within = divmod(k, recipe.gradient_accumulation * recipe.batch_size)
        index = example_index(recipe.seed, k, len(self.training_set))  # slot k: as batch_indices numbers them
        return self.training_set.example(index, iteration_generator(recipe.seed, iteration, 100 + within))


class MagnetTrainer:
    """Train a MAGNET LoRA on ``adapter``'s transformer (an ``SD3Adapter``), checkpointing into ``folder``."""

    def __init__(self, adapter, recipe: MagnetRecipe, training_set: TrainingSet, folder: Path, code: str = "",
                 loader_workers: int = 0):
        """``code``: what identifies the training code (its fingerprint); checkpoints of other code are not resumed.
        ``loader_workers``: processes preparing the next batches while the model trains (a real SA-1B example
        takes about a second of CPU)."""
        self.adapter, self.recipe, self.training_set, self.folder = adapter, recipe, training_set, Path(folder)
        self.code = code
        self.transformer = adapter.transformer
        self.device = adapter.device
        torch.manual_seed(recipe.seed)  # the LoRA's Gaussian A and the head's initial weights
        lora = add_lora(self.transformer, recipe.lora_rank, recipe.lora_alpha)
        for parameter in lora:  # trained in float32 under autocast, as peft with an fp16 base model
            parameter.data = parameter.data.float()
        self.transformer.train()
        self.head = AttentionScoreHead().to(self.device) if recipe.conv_head else None
        groups = [{"params": lora, "lr": recipe.lr_lora}]
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": recipe.lr_head})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda iteration: learning_rate_factor(iteration, recipe))
        self.autocast = recipe.mixed_precision and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast)
        self.parameters = [p for group in groups for p in group["params"]]
        self.sigmas, self.timesteps = self._training_schedule()
        self.iteration = 0
        self.history: list[dict] = []
        self.loader_workers = loader_workers
        self._batches, self._next_batch = None, 0

    # -- one iteration ------------------------------------------------------------------------------------
    def _training_schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The descending sigmas and timesteps of the 1000-step flow-matching schedule with the recipe's shift."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = {**self.adapter.pipe.scheduler.config, "num_train_timesteps": self.recipe.train_timesteps,
                  "shift": self.recipe.shift, "use_dynamic_shifting": False}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        return scheduler.sigmas[: self.recipe.train_timesteps].float(), scheduler.timesteps.float()

    def _examples(self, micro_step: int) -> list[MaskExample]:
        """The micro-batch's examples, prepared ahead by ``loader_workers`` processes when there are any."""
        batch = self.iteration * self.recipe.gradient_accumulation + micro_step
        if self._batches is None or self._next_batch != batch:
            size = self.recipe.batch_size
            schedule = ScheduledExamples(self.training_set, self.recipe)
            self._batches = iter(torch.utils.data.DataLoader(
                schedule, batch_size=size, sampler=range(batch * size, len(schedule)), collate_fn=list,
                num_workers=self.loader_workers, prefetch_factor=2 if self.loader_workers else None))
        self._next_batch = batch + 1
        return next(self._batches)

    def _noised(self, latents: torch.Tensor, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t, the timesteps and the noise ε: u = sigmoid(N(0, std)) picks index ⌊1000u⌋ of the schedule."""
        generator = iteration_generator(self.recipe.seed, self.iteration, micro_step)
        u = torch.sigmoid(torch.randn(latents.shape[0], generator=generator) * self.recipe.timestep_std)
        index = (u * self.recipe.train_timesteps).long().clamp(max=self.recipe.train_timesteps - 1)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigma = self.sigmas[index].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        return (1 - sigma) * latents + sigma * noise, self.timesteps[index].to(latents.device), noise

    def _candidates(self, logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One image's score maps: [77 tokens, h, w] head-mean (COCO) or [heads·77, h, w] with index
        head·77 + token (SA-1B), the conv head's residual added to each."""
        heads, n_image, n_text = logits.shape
        maps = logits.mean(0, keepdim=True) if self.recipe.protocol == "coco" else logits
        if self.recipe.mask_logits == "normalized":
            low = maps.amin(dim=1, keepdim=True)
            maps = (maps - low) / ((maps - low).amax(dim=1, keepdim=True) + 1e-6)
        maps = maps.transpose(1, 2).reshape(-1, *grid)
        return self.head(maps) if self.head is not None else maps

    def _predictions(self, candidates: torch.Tensor, example: MaskExample) -> tuple[torch.Tensor, torch.Tensor]:
        """The (prediction, mask) pairs of one image: identity matching by the class words' BPE ids (COCO),
        Hungarian matching of every head's token maps (SA-1B)."""
        masks = example.masks.to(candidates.device)
        if self.recipe.protocol == "coco":
            tokenizer = self.adapter.tokenizer
            # Truncated to the 77 positions, not padded; a class whose words fell past them is dropped with its
            # mask, as the official trainer does.
            ids = tokenizer(example.prompt.lower(), max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids[0].to(candidates.device)
            words = [tokenizer(name.lower(), add_special_tokens=False).input_ids for name in example.class_names]
            kept = classes_in_prompt(ids, words)
            if not kept:
                return candidates[:0], masks[:0]
            return class_token_maps(candidates, ids, [words[i] for i in kept]), masks[kept]
        with torch.no_grad():
            chosen, matched = hungarian_match(candidates.float(), masks, focal_p_t_from=self.recipe.focal_p_t_from)
        return candidates[chosen], masks[matched]

    def _loss(self, micro_step: int) -> dict[str, torch.Tensor]:
        adapter, recipe = self.adapter, self.recipe
        examples = self._examples(micro_step)
        images = torch.stack([example.image for example in examples])
        with torch.no_grad():
            latents = encode_normalised_latents(adapter.pipe.vae, 2 * images - 1, self.device).float()
            prompt_embeds, pooled = adapter.encode_prompts([example.prompt for example in examples])
        noisy, timesteps, noise = self._noised(latents, micro_step)
        with torch.autocast("cuda", torch.float16, enabled=self.autocast), \
                I2TLogitsTap(self.transformer, recipe.layer, adapter.tokenizer.model_max_length) as tap:
            velocity = self.transformer(hidden_states=noisy.to(adapter.dtype), timestep=timesteps,
                                        encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                                        return_dict=False)[0]
            pairs = [self._predictions(self._candidates(tap.logits[i], adapter.token_grid), example)
                     for i, example in enumerate(examples)]
        flow = flow_matching_loss(velocity.float(), noise, latents)
        # The official divisor: the ground-truth masks of the batch (Hungarian), the classes kept (identity);
        # at least 1 here, where the official identity matching would divide by zero.
        counted = pairs if recipe.protocol == "coco" else [(None, example.masks) for example in examples]
        num_masks = max(sum(len(masks) for _, masks in counted), 1)
        predictions = torch.cat([prediction.float() for prediction, _ in pairs])
        masks = torch.cat([mask.to(predictions.device) for _, mask in pairs]).float()
        terms = mask_losses(predictions, masks, num_masks, focal_p_t_from=recipe.focal_p_t_from)
        return {"loss": total_loss(flow, terms["focal"], terms["dice"]), "flow_matching": flow, **terms}

    def step(self) -> dict[str, float]:
        """One optimiser step (``gradient_accumulation`` micro-batches); returns the losses and learning rates."""
        recipe = self.recipe
        sums: dict[str, float] = {}
        for micro_step in range(recipe.gradient_accumulation):
            losses = self._loss(micro_step)
            self.scaler.scale(losses["loss"] / recipe.gradient_accumulation).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item() / recipe.gradient_accumulation
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, recipe.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.schedule.step()
        self.iteration += 1
        record = {"iteration": self.iteration, **sums, "grad_norm": grad_norm, "lr_lora": learning_rates[0]}
        self.history.append(record)
        return record

    # -- checkpoints --------------------------------------------------------------------------------------
    @property
    def checkpoint_folder(self) -> Path:
        return self.folder / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/iter_NNNNNN.pt`` atomically: a kill while writing leaves the previous one whole."""
        state = {
            "iteration": self.iteration,
            "recipe": asdict(self.recipe),
            "code": self.code,
            "lora": lora_state_dict(self.transformer),
            "head": None if self.head is None else self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.checkpoint_folder / CHECKPOINT_PATTERN.format(self.iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def resume(self) -> int:
        """Load the newest checkpoint of this folder; return its iteration (0: none). Checkpoints written by
        another recipe or another version of the training code are deleted, with a log line: resuming from
        them would mix two runs."""
        for path in sorted(self.checkpoint_folder.glob("iter_*.pt"), reverse=True):
            state = torch.load(path, map_location=self.device, weights_only=False)
            identity = {**asdict(self.recipe), "code": self.code}
            saved = {**state["recipe"], "code": state.get("code")}
            if saved != identity:
                LOG.warning("starting over: the checkpoints in %s were written with other settings (%s)",
                            self.checkpoint_folder, _difference(saved, identity))
                for stale in self.checkpoint_folder.glob("iter_*.pt"):
                    stale.unlink()
                (self.folder / "checkpoint_scores.json").unlink(missing_ok=True)
                return 0
            load_lora_state(self.transformer, state["lora"])
            if self.head is not None:
                self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.scaler.load_state_dict(state["scaler"])
            self.iteration, self.history = state["iteration"], state["history"]
            LOG.info("resuming from %s (iteration %d of %d)", path, self.iteration, self.recipe.iterations)
            return self.iteration
        return 0

    def train(self, evaluate: Callable[[], float] | None = None, on_step: Callable[[dict], None] | None = None) -> dict:
        """Run (or finish) the recipe's iterations from the newest checkpoint; write the adapter of the chosen
        checkpoint (``checkpoint_policy``: the last, or the best by ``evaluate()``, e.g. VOC20 mIoU) and return
        what was chosen."""
        recipe = self.recipe
        if recipe.checkpoint_policy == "best" and evaluate is None:
            raise ValueError("checkpoint_policy 'best' needs an evaluation (a validation set for the mIoU)")
        start = self.resume()
        scores: dict[int, float] = {int(k): v for k, v in _read_scores(self.folder).items()}
        bar = progress(total=recipe.iterations, initial=start, desc=f"MAGNET {recipe.protocol}", unit="it")
        while self.iteration < recipe.iterations:
            record = self.step()
            bar.update(1)
            if on_step is not None:
                on_step(record)
            if self.iteration % recipe.checkpoint_every == 0 or self.iteration == recipe.iterations:
                self.save_checkpoint()
                if evaluate is not None:
                    scores[self.iteration] = float(evaluate())
                    atomic_write_json(self.folder / "checkpoint_scores.json", scores)
        bar.close()
        chosen = self.iteration if recipe.checkpoint_policy == "last" else max(scores, key=scores.get)
        return {"policy": recipe.checkpoint_policy, "iteration": chosen, "scores": scores}

    def write_adapter(self, folder: Path, checkpoint: dict, info: dict) -> None:
        """Save the LoRA of the chosen checkpoint as an adapter folder, with ``info``, the recipe and the choice."""
        if checkpoint["iteration"] != self.iteration:
            path = self.checkpoint_folder / CHECKPOINT_PATTERN.format(checkpoint["iteration"])
            load_lora_state(self.transformer, torch.load(path, map_location=self.device, weights_only=False)["lora"])
        lora = {"rank": self.recipe.lora_rank, "alpha": self.recipe.lora_alpha, "targets": list(LORA_TARGETS)}
        save_adapter(self.transformer, folder, {**info, "protocol": self.recipe.protocol, "lora": lora,
                                                "recipe": asdict(self.recipe), "seed": self.recipe.seed,
                                                "checkpoint": checkpoint})


def _read_scores(folder: Path) -> dict:
    path = folder / "checkpoint_scores.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _difference(saved: dict, wanted: dict) -> str:
    changed = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    return ", ".join(f"{key}: {saved.get(key)!r} → {wanted.get(key)!r}" for key in changed)
