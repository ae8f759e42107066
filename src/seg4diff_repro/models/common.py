"""What every backbone adapter shares: noising, VAE encoding, and loading a diffusers pipeline with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from seg4diff_repro.config import looks_like_local_path
from seg4diff_repro.progress import quiet_library_progress_bars

HF_LOGIN_HELP = (
    "Accept the model licence at https://huggingface.co/{repo} while logged in, then log in here with "
    "`hf auth login` (or `huggingface-cli login`), or set the HF_TOKEN environment variable to a token "
    "with read access. A local folder written by `save_pretrained` works too: set the model's `source` "
    "to that folder."
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Noising:
    """Where on the sampling schedule the input is noised: ``k`` steps before the end of ``num_steps``."""

    k: int
    num_steps: int
    index: int
    timestep: float
    sigma: float


def noising_at_step(scheduler, k: int, num_steps: int, set_timesteps: Callable[[], object]) -> Noising:
    """``timesteps[-k]`` of the ``num_steps`` schedule that ``set_timesteps()`` puts on ``scheduler``."""
    if not 1 <= k <= num_steps:
        raise ValueError(f"timestep k={k} out of range: use 1..{num_steps} (k steps before the end)")
    set_timesteps()
    index = num_steps - k
    return Noising(
        k=k,
        num_steps=num_steps,
        index=index,
        timestep=float(scheduler.timesteps[index]),
        sigma=float(scheduler.sigmas[index]),
    )


def noise_latents_per_image(scheduler, latents: torch.Tensor, index: int, seeds: list[int]) -> torch.Tensor:
    """x_t = (1 − σ)·z + σ·ε at ``scheduler.timesteps[index]`` (the stock ``scale_noise``), ε drawn per image.

    Each image's ε comes from a CPU generator seeded with its own seed, so it depends neither on the device
    nor on the batching. ``scheduler`` must already be on the schedule the index refers to.
    """
    noise = torch.stack(
        [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    ).to(latents.device, latents.dtype)
    timestep = scheduler.timesteps[index].expand(latents.shape[0])
    return scheduler.scale_noise(latents, timestep, noise)


def encode_normalised_latents(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """VAE posterior means of ``pixels`` (in the model's input range), shifted and scaled by the VAE config."""
    mean = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    return (mean - shift) * vae.config.scaling_factor


def apply_model_lora(adapter, lora: str | Path | None) -> None:
    """Put the MAGNET adapter in folder ``lora`` on a loaded backbone adapter's transformer (LoRA only, as the
    official evaluation: `magnet.lora.apply_lora`) and keep its adapter.json as ``adapter.lora_info``."""
    if lora is None:
        return
    from seg4diff_repro.magnet.lora import apply_lora

    adapter.lora_info = apply_lora(adapter.transformer, lora)
    adapter.transformer.eval()  # the injected LoRA layers start in training mode


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling (``__cause__``, ``__context__``)."""
    chain, todo = [], [error]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        todo += [current.__cause__, current.__context__]
    return chain


def load_pipeline(
    pipeline_class, source: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None, **components
):
    """``pipeline_class.from_pretrained`` from a Hugging Face id (at ``revision``, a commit, if given) or a local
    folder, with errors that say what to do."""
    source = str(source)
    if revision is not None and looks_like_local_path(source):
        raise ModelLoadError(
            f"revision {revision!r} was given for {source}, a local folder, which has no hub revision: "
            "set the model's `revision` to null"
        )
    if looks_like_local_path(source):
        # Never a hub id: a missing folder must not send the hub a request for "models/..." or "./...".
        source = str(Path(source).expanduser())
        if not Path(source).exists():
            raise ModelLoadError(
                f"{source} does not exist and is not a Hugging Face id (owner/name): check the model's `source` "
                f"(a model with `build` in the config is written by `snakemake {source}`)."
            )
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise ModelLoadError(
            f"{source} has no model_index.json: point the model's `source` at a folder written by "
            "`save_pretrained` (or a Hugging Face id)."
        )
    quiet_library_progress_bars()  # diffusers is imported by now
    try:
        with warnings.catch_warnings():
            # diffusers ≥ 0.42 renames torch_dtype to dtype; older releases know only torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if revision is not None:
                components["revision"] = revision
            return pipeline_class.from_pretrained(source, torch_dtype=dtype, **components)
    except OSError as error:
        _raise_hub_error(error, source, revision)
        raise


def _raise_hub_error(error: OSError, source: str, revision: str | None) -> None:
    """Raise a ModelLoadError that says what to do, when ``error`` (from fetching ``source``) comes from the hub
    or the local cache; return otherwise, for the caller to re-raise ``error``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # diffusers catches the hub's error on its metadata call, retries from the local cache and then
    # raises a plain OSError "from" the hub error, so look through the whole chain.
    chain = _error_chain(error)

    def find(kind):
        return next((e for e in chain if isinstance(e, kind)), None)

    if (cause := find(RevisionNotFoundError)) is not None:
        raise ModelLoadError(
            f"{source} has no revision {revision!r} on the Hugging Face hub: set the model's `revision` to a "
            f"commit listed at https://huggingface.co/{source}/commits/main (or null for the newest)"
        ) from cause
    if (cause := find(GatedRepoError)) is not None:
        raise ModelLoadError(f"{source} is a gated model and this machine has no access. "
                             + HF_LOGIN_HELP.format(repo=source)) from cause
    if (cause := find(RepositoryNotFoundError)) is not None:
        # The hub answers 401 "not found" for gated repositories when no token is sent.
        raise ModelLoadError(f"{source} was not found on the Hugging Face hub or needs a login. "
                             + HF_LOGIN_HELP.format(repo=source)) from cause
    if (cause := find(OfflineModeIsEnabled)) is not None:
        raise ModelLoadError(
            f"{source} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode is "
            "on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE and connect to the network once to download it, "
            "set HF_HOME to a cache that has it, or set the model's `source` to a local folder."
        ) from cause
    if (cause := find(LocalEntryNotFoundError)) is not None:
        raise ModelLoadError(
            f"{source} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub could "
            "not be reached. Connect to the network once (or set HF_HOME to a cache that has it), "
            "or set the model's `source` to a local folder."
        ) from error


def download_pipeline(pipeline_class, source: str, revision: str | None = None, **components) -> Path:
    """Fetch the files ``load_pipeline`` would read into the local Hugging Face cache, loading nothing (the
    components passed as None, e.g. SD3's T5, are skipped); return the snapshot folder."""
    if revision is not None:
        components["revision"] = revision
    try:
        return Path(pipeline_class.download(source, **components))
    except OSError as error:
        _raise_hub_error(error, source, revision)
        raise


class FileHashes:
    """sha256 of files, remembered by (path, size, modification time) in the user's cache folder.

    A real model folder holds tens of GB (34 for FLUX.1-dev with T5-XXL): hashing it for every job's
    cache key would cost a minute each time. Jobs of the workflow keep this file in the project's
    .cache/ (XDG_CACHE_HOME); a lost or damaged memo only means hashing again.
    """

    def __init__(self) -> None:
        self.path = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "seg4diff" / "file_sha256.json"
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.known:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            self.known[key], self.changed = digest.hexdigest(), True
        return self.known[key]

    def save(self) -> None:
        if self.changed:
            from seg4diff_repro.atomic import atomic_write_json

            atomic_write_json(self.path, self.known)  # concurrent jobs: the last writer wins, nothing breaks


def _folder_fingerprint(folder: Path) -> str:
    """``sha256:...`` over a folder's files (names and bytes; hidden files left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    hashes = FileHashes()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(hashes.sha256(path)))
    hashes.save()
    return f"sha256:{digest.hexdigest()}"


def adapter_fingerprint(folder: str | Path) -> str:
    """What a MAGNET adapter folder holds, by content (its weights and adapter.json), with the error of
    `read_adapter_info` when the folder is not an adapter."""
    from seg4diff_repro.magnet.lora import read_adapter_info

    read_adapter_info(folder)
    return _folder_fingerprint(Path(folder).expanduser())


def model_fingerprint(
    source: str | Path, revision: str | None = None, *, marker: str = "model_index.json", lora: str | Path | None = None
) -> str:
    """What the weights are, by content: ``sha256:...`` over a local folder's files (names and bytes), or
    ``hub:<id>@<commit>`` for a Hugging Face id, read from the local hub cache that loading filled
    (``revision`` None: the commit the hub's ``main`` pointed at when it was loaded). ``lora``: the MAGNET adapter
    folder applied after loading; its content is appended (``...+lora:sha256:...``).

    Keys of cached results include it, so that rebuilding, retraining or replacing a model (or its adapter)
    recomputes what was computed from it. ``marker``: a file every snapshot of the repository has (a diffusers
    pipeline's model_index.json; config.json for a transformers model).
    """
    weights = _weights_fingerprint(source, revision, marker)
    return weights if lora is None else f"{weights}+lora:{adapter_fingerprint(lora)}"


def _weights_fingerprint(source: str | Path, revision: str | None, marker: str) -> str:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _folder_fingerprint(folder)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(source), marker, revision=revision)
    if not isinstance(cached, str):
        raise ModelLoadError(
            f"{source} is neither a local folder nor in the local Hugging Face cache: load it once "
            "(the extraction rule does) before asking for its fingerprint."
        )
    return f"hub:{source}@{Path(cached).parent.name}"  # snapshots/<commit>/model_index.json


def model_record(source: str | Path, revision: str | None = None) -> dict[str, str | None]:
    """The model columns of an output made by a job that loads the model itself: its source, the configured
    revision and the fingerprint of what was loaded (the resolved commit for a hub id)."""
    return {"model_source": str(source), "model_revision": revision,
            "model_fingerprint": model_fingerprint(source, revision)}


def adapter_record(folder: str | Path) -> dict:
    """What outputs made with a MAGNET adapter record of it: where it was read, its content fingerprint, and
    from its adapter.json the run, protocol, checkpoint (policy, iteration), LoRA settings, recipe and seed."""
    from seg4diff_repro.magnet.lora import read_adapter_info

    info = read_adapter_info(folder)
    return {"folder": str(folder), "fingerprint": adapter_fingerprint(folder),
            **{key: info.get(key) for key in ("run", "protocol", "checkpoint", "lora", "recipe", "seed", "base_model")}}


def describe_model_source(source: str | Path) -> dict:
    """Provenance of a model source: the local folder's recorded metadata, or the hub id."""
    info_file = Path(source) / "seg4diff_model.json"
    if info_file.is_file():
        return {"source": str(source), **json.loads(info_file.read_text())}
    return {"source": str(source)}


