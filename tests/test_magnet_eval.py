"""MAGNET adapters as model variants: applied at load, keyed by content, recorded, validated, and tabulated.

References: the LoRA computation W x + b + (α/r) B A x done by hand in float64 from the saved tensors (and, for the
whole transformer, the same update merged into a copy of the base weights); a re-saved adapter's bytes; the config
that is edited; per-layer score files written here, whose numbers the table must reproduce.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from magnet_adapters import TOY_MODEL, make_toy_adapter, plan_adapters
from seg4diff_repro.cli import main
from seg4diff_repro.config import ConfigError, check_config
from seg4diff_repro.magnet.lora import ADAPTER_WEIGHTS
from seg4diff_repro.models import load_adapter
from seg4diff_repro.models.common import model_fingerprint
from seg4diff_repro.models.sd3 import load_sd3_pipeline
from test_workflow import REPO, copy_workflow, snakemake

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
RANK, ALPHA = 4, 8  # α/r = 2, so that a scaling left out (or inverted) shows


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_toy_adapter(tmp_path_factory.mktemp("adapter") / "adapter", rank=RANK, alpha=ALPHA, scale=0.2)


def test_an_adapter_changes_a_projection_by_exactly_the_scaled_lora_update(adapter):
    base = load_sd3_pipeline(TOY_MODEL, torch.float64).transformer
    variant = load_adapter("sd3", str(TOY_MODEL), "float64", lora=adapter)
    assert variant.lora_info["run"] == "toy_sd3_coco" and variant.lora_info["lora"]["rank"] == RANK
    saved = load_file(str(adapter / ADAPTER_WEIGHTS))
    inner = base.config.num_attention_heads * base.config.attention_head_dim  # the projections' width
    x = torch.randn(3, 5, inner, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    last = base.config.num_layers - 1
    for name in ("transformer_blocks.2.attn.to_k", f"transformer_blocks.{last}.attn.to_out.0"):
        linear = base.get_submodule(name)
        a, b = saved[f"{name}.lora_A.weight"].double(), saved[f"{name}.lora_B.weight"].double()
        expected = x @ linear.weight.T + linear.bias + (ALPHA / RANK) * (x @ a.T @ b.T)
        with torch.no_grad():
            found = variant.transformer.get_submodule(name)(x)
            unchanged = linear(x)
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)
        assert (found - unchanged).abs().max() > 1e-3  # the update is not negligible
    # The text stream's projections carry no LoRA (the image stream only, as the official code).
    with torch.no_grad():
        text = x[..., : base.get_submodule("transformer_blocks.2.attn.add_k_proj").in_features]
        torch.testing.assert_close(variant.transformer.get_submodule("transformer_blocks.2.attn.add_k_proj")(text),
                                   base.get_submodule("transformer_blocks.2.attn.add_k_proj")(text), rtol=0, atol=0)


def test_the_transformer_output_equals_the_base_weights_with_the_update_merged_in(adapter):
    base = load_sd3_pipeline(TOY_MODEL, torch.float64).transformer.eval()
    merged = copy.deepcopy(base)
    saved = load_file(str(adapter / ADAPTER_WEIGHTS))
    updated = 0
    with torch.no_grad():
        for key in saved:
            if key.endswith(".lora_A.weight"):
                name = key[: -len(".lora_A.weight")]
                a, b = saved[key].double(), saved[f"{name}.lora_B.weight"].double()
                merged.get_submodule(name).weight += (ALPHA / RANK) * (b @ a)
                updated += 1
    assert updated == base.config.num_layers * 4  # to_q, to_k, to_v, to_out.0 of each joint block
    variant = load_adapter("sd3", str(TOY_MODEL), "float64", lora=adapter).transformer
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, base.config.sample_size, base.config.sample_size, dtype=torch.float64,
                                  generator=generator),
        encoder_hidden_states=torch.randn(2, 154, base.config.joint_attention_dim, dtype=torch.float64,
                                          generator=generator),
        pooled_projections=torch.randn(2, base.config.pooled_projection_dim, dtype=torch.float64, generator=generator),
        timestep=torch.tensor([300.0, 700.0], dtype=torch.float64), return_dict=False,
    )
    with torch.no_grad():
        found, expected, before = variant(**inputs)[0], merged(**inputs)[0], base(**inputs)[0]
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)  # 12 trained blocks amplify float64 rounding to ~1e-7
    assert (found - before).abs().max() > 1e-3


def test_the_fingerprint_covers_the_adapters_bytes(adapter, tmp_path):
    weights = model_fingerprint(TOY_MODEL)
    with_adapter = model_fingerprint(TOY_MODEL, lora=adapter)
    assert with_adapter.startswith(f"{weights}+lora:sha256:")
    copied = shutil.copytree(adapter, tmp_path / "copy")
    assert model_fingerprint(TOY_MODEL, lora=copied) == with_adapter  # by content, not by path
    make_toy_adapter(tmp_path / "retrained", rank=RANK, alpha=ALPHA, scale=0.2, seed=1)  # "retrained": other weights
    shutil.copy(tmp_path / "retrained" / ADAPTER_WEIGHTS, copied / ADAPTER_WEIGHTS)
    changed = model_fingerprint(TOY_MODEL, lora=copied)
    assert changed.startswith(f"{weights}+lora:") and changed != with_adapter
    (copied / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{copied} is not a MAGNET adapter folder")):
        model_fingerprint(TOY_MODEL, lora=copied)


def test_extraction_applies_the_adapter_and_records_it(adapter, tmp_path):
    from seg4diff_repro.attention.cache import read_cached_image
    from seg4diff_repro.attention.extract import ExtractionSettings, extract_attention
    from seg4diff_repro.datasets import generate_toy_shapes

    generate_toy_shapes(tmp_path / "data", n_train=1, n_val=2, seed=3)
    spec = dict(model="toy", dataset="toy", backbone="sd3", source=str(TOY_MODEL), dtype="float32", timestep=8,
                num_steps=28, layers=[0], seed=0, short_side=None, resize="stretch", prompt="oracle",
                background_name="background", split="val", background="drop", limit=None)
    plain = extract_attention(ExtractionSettings.from_dict(spec), tmp_path / "data", tmp_path / "plain")
    tuned = extract_attention(ExtractionSettings.from_dict({**spec, "lora": str(adapter)}), tmp_path / "data",
                              tmp_path / "tuned")
    assert plain["lora"] is None
    record = tuned["lora"]
    assert (record["run"], record["protocol"], record["checkpoint"]) == ("toy_sd3_coco", "coco",
                                                                          {"policy": "last", "iteration": 7})
    assert tuned["inputs"]["model_fingerprint"] == model_fingerprint(TOY_MODEL, lora=adapter)
    assert record["fingerprint"] == tuned["inputs"]["model_fingerprint"].split("+lora:")[1]
    image_id = plain["image_ids"][0]
    maps = [read_cached_image(tmp_path / name, image_id).i2t.astype(np.float64) for name in ("plain", "tuned")]
    assert np.abs(maps[0] - maps[1]).max() > 1e-3  # the adapter reached the recorded attention


def toy_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["models"]["toy_sd3_magnet_coco"].update(lora="nope"),
         "models.toy_sd3_magnet_coco.lora = 'nope' names no MAGNET run; defined runs (magnet.runs): "
         "['toy_sd3_coco', 'toy_sd3_sa1b']"),
        (lambda c: c["models"]["toy_sd3_magnet_coco"].update(source="results/models/toy_sd3_random"),
         "models.toy_sd3_magnet_coco.source = 'results/models/toy_sd3_random', but its adapter (lora: toy_sd3_coco) is "
         "trained on models.toy_sd3 (magnet.runs.toy_sd3_coco.model), whose source is 'models/toy_sd3'"),
        (lambda c: c["models"]["toy_sd3_magnet_coco"].update(backbone="flux"),
         "models.toy_sd3_magnet_coco.backbone = 'flux', but its adapter (lora: toy_sd3_coco)"),
        (lambda c: c["models"]["toy_sd3_magnet_coco"].update(analysis_layer=3),
         "set models.toy_sd3_magnet_coco.analysis_layer to 5"),
        (lambda c: c["magnet"]["runs"]["toy_sd3_coco"].update(model="missing"),
         "magnet.runs.toy_sd3_coco.model = 'missing' is not defined"),
        (lambda c: c["magnet"]["runs"].update(again={"model": "toy_sd3_magnet_coco", "protocol": "coco", "data": {"prepared": "toy_world_objects"}}),
         "magnet.runs.again.model = 'toy_sd3_magnet_coco' is itself a MAGNET variant"),
        (lambda c: c["magnet"]["runs"]["toy_sd3_coco"].update(validation={"dataset": "voc99"}),
         "magnet.runs.toy_sd3_coco.validation.dataset = 'voc99' is not defined"),
        (lambda c: c["magnet"]["runs"]["toy_sd3_coco"].update(recipe={"checkpoint_policy": "best"}),
         "magnet.runs.toy_sd3_coco.recipe.checkpoint_policy is best, which needs a validation set"),
        (lambda c: c["magnet"]["runs"]["toy_sd3_coco"]["data"].update(format="sa1b"),
         "magnet.runs.toy_sd3_coco.data.format is sa1b, whose masks have no classes for the coco protocol"),
        (lambda c: c["magnet"]["runs"]["toy_sd3_coco"].update(protocol="ade"),
         "magnet.runs.toy_sd3_coco.protocol = 'ade' is not allowed; allowed values: ['coco', 'sa1b']"),
        (lambda c: c["appendix"]["models"].update(sd3="toy_sd3_magnet_coco"),
         "appendix.models.sd3 = 'toy_sd3_magnet_coco' is a MAGNET variant (lora: toy_sd3_coco), but the generation "
         "analyses of this role do not apply adapters: name its base model ('toy_sd3')"),
        (lambda c: c["appendix"]["models"].update(sd3_magnet_coco="toy_sd3"),
         "appendix.models.sd3_magnet_coco = 'toy_sd3' has no `lora`"),
        (lambda c: c["appendix"]["models"].update(sd3_magnet_coco="toy_sd3_magnet_sa1b"),
         "appendix.models.sd3_magnet_coco = 'toy_sd3_magnet_sa1b' applies run 'toy_sd3_sa1b' (protocol sa1b"),
    ],
)
def test_a_bad_magnet_config_names_the_key_and_what_to_do(edit, message):
    config = toy_config()
    check_config(copy.deepcopy(config), SCHEMA)  # the committed config passes
    edit(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(config, SCHEMA)


def test_without_magnet_roles_the_config_is_valid():
    config = toy_config()
    config["appendix"]["models"].update(sd3_magnet_coco=None, sd3_magnet_sa1b=None)
    del config["magnet"]
    for name in ("toy_sd3_magnet_coco", "toy_sd3_magnet_sa1b"):
        del config["models"][name]
    check_config(config, SCHEMA)


def test_a_dry_run_gives_the_variants_jobs_the_adapter_as_input_and_setting(tmp_path):
    workdir = copy_workflow(tmp_path)
    plan_adapters(workdir)
    stdout = snakemake(
        workdir, "-n", "-p", "results/attention/toy_sd3_magnet_coco/toy_objects/t8/manifest.json",
        "results/attention_null/toy_sd3_magnet_sa1b/toy_stuff/t8/manifest.json",
        "results/segmentation_heads/toy_sd3_magnet_coco/toy_objects/t8/per_head.csv",
    ).stdout
    # Each job loading a variant waits for its adapter: the folder is an input that a planned job writes.
    loading = [(message, reason) for message, reason in re.findall(r"Job \d+: (.*)\nReason: (.*)", stdout)
               if "orward passes of toy_sd3_magnet" in message]
    assert len(loading) == 3  # extraction, empty-prompt extraction, per-head scoring
    for message, reason in loading:
        run = "toy_sd3_coco" if "toy_sd3_magnet_coco" in message else "toy_sd3_sa1b"
        assert f"results/magnet/{run}/adapter" in reason.split("Input files updated by another job: ")[1], reason
    # The printed shell commands, split as the shell would (a quote inside the JSON is shell-escaped).
    commands = [shlex.split(line) for line in stdout.splitlines() if "--settings '" in line]
    settings = [json.loads(words[words.index("--settings") + 1]) for words in commands]
    assert sum("recipe" in s for s in settings) == 2  # the two magnet_train jobs that write the adapters
    settings = [s for s in settings if "recipe" not in s]
    assert sorted(s["lora"] for s in settings) == ["results/magnet/toy_sd3_coco/adapter"] * 2 + [
        "results/magnet/toy_sd3_sa1b/adapter"]
    assert all(s["source"] == "models/toy_sd3" for s in settings)


def scores(folder: Path, model: str, mious: list[float], **columns) -> Path:
    """A per-layer score file as score-layers writes it: one row per layer, settings on every row."""
    rng = np.random.default_rng(len(model))
    frame = pd.DataFrame({
        "model": model, "dataset": "toy_objects", "layer": range(len(mious)), "pACC": rng.uniform(50, 99, len(mious)),
        "mACC": rng.uniform(40, 90, len(mious)), "mIoU": mious, "mIoU_overflow_official": mious,
        "images": 64, "timestep_k": 8, "num_steps": 28, "sigma": 0.515072, "prompt": "oracle", "seed": 0,
        **columns, "code_version": "0.1.0 (test)",
    })
    path = folder / f"{model}.csv"
    frame.to_csv(path, index=False)
    return path


def fake_adapter(folder: Path, run: str, protocol: str, iteration: int) -> Path:
    folder.mkdir(parents=True)
    (folder / ADAPTER_WEIGHTS).write_bytes(run.encode())
    (folder / "adapter.json").write_text(json.dumps({
        "run": run, "protocol": protocol, "lora": {"rank": 16, "alpha": 16}, "checkpoint": {"policy": "last",
        "iteration": iteration}, "recipe": {"iterations": iteration, "scaling": {"iterations": "3000 -> 40"}},
    }))
    return folder


def test_the_magnet_table_reproduces_the_score_files_it_reads(tmp_path):
    from seg4diff_repro.models.common import adapter_fingerprint

    rng = np.random.default_rng(7)
    mious = {name: rng.uniform(10, 90, 6).tolist() for name in ("base", "coco", "sa1b")}
    adapters = [fake_adapter(tmp_path / run, run, protocol, 40 + i)
                for i, (run, protocol) in enumerate((("toy_sd3_coco", "coco"), ("toy_sd3_sa1b", "sa1b")))]
    files = [scores(tmp_path, "toy_sd3", mious["base"])] + [
        scores(tmp_path, f"toy_sd3_magnet_{protocol}", mious[protocol], lora_run=folder.name, lora_protocol=protocol,
               lora_checkpoint="last", lora_iteration=40 + i, lora_fingerprint=adapter_fingerprint(folder))
        for i, (protocol, folder) in enumerate(zip(("coco", "sa1b"), adapters))
    ]
    out = {ext: tmp_path / f"toy_world_magnet.{ext}" for ext in ("csv", "md")}
    layer = 2
    main(["magnet-effect-table", "--base", str(files[0]), "--variants", *map(str, files[1:]),
          "--adapters", *map(str, adapters), "--layer", str(layer), "--title", "Toy MAGNET",
          "--csv", str(out["csv"]), "--markdown", str(out["md"])])
    table = pd.read_csv(out["csv"])
    assert table["model"].tolist() == ["toy_sd3", "toy_sd3_magnet_coco", "toy_sd3_magnet_sa1b"]
    for row, name, source in zip(table.itertuples(), ("base", "coco", "sa1b"), files):
        read = pd.read_csv(source)
        assert row.mIoU == read["mIoU"][layer] and row.pACC == read["pACC"][layer]  # the file's floats, unrounded
        assert row.diff_mIoU == pytest.approx(mious[name][layer] - mious["base"][layer], abs=1e-12)
        assert row.best_layer == int(np.argmax(mious[name])) and row.best_mIoU == max(mious[name])
        assert row.supervised_layer == layer and row.sigma == 0.515072 and row.images == 64
    assert table["lora_iteration"].tolist()[1:] == [40, 41] and pd.isna(table["lora_iteration"][0])
    assert json.loads(table["lora_recipe"][2])["scaling"] == {"iterations": "3000 -> 40"}
    markdown = out["md"].read_text()
    assert "`toy_sd3_sa1b` (sa1b, checkpoint last at iteration 41" in markdown
    # A retrained adapter that the scores were not computed with is refused.
    (adapters[0] / ADAPTER_WEIGHTS).write_bytes(b"retrained")
    with pytest.raises(ValueError, match="re-run the scores"):
        main(["magnet-effect-table", "--base", str(files[0]), "--variants", *map(str, files[1:]),
              "--adapters", *map(str, adapters), "--layer", str(layer), "--title", "Toy MAGNET",
              "--csv", str(out["csv"]), "--markdown", str(out["md"])])


def check_magnet_outputs(workdir: Path, tables: str = "paper_tables/toy") -> None:
    """The toy MAGNET table and the + MAGNET rows of main Table 1 against the per-layer score files they read."""
    effect = pd.read_csv(workdir / tables / "toy_world_magnet_t8.csv")
    assert effect["model"].tolist() == ["toy_sd3", "toy_sd3_magnet_sa1b", "toy_sd3_magnet_coco"]
    layer = int(effect["supervised_layer"].iloc[0])
    per_layer = {model: pd.read_csv(workdir / f"results/segmentation/{model}/toy_objects/t8/per_layer.csv")
                 for model in effect["model"]}
    for row in effect.itertuples():
        scores = per_layer[row.model]
        assert row.mIoU == scores["mIoU"][layer] and row.mACC == scores["mACC"][layer]  # full precision
        assert row.diff_mIoU == pytest.approx(scores["mIoU"][layer] - per_layer["toy_sd3"]["mIoU"][layer], abs=1e-12)
        assert (row.best_layer, row.best_mIoU) == (scores["mIoU"].idxmax(), scores["mIoU"].max())
    adapters = effect.dropna(subset=["lora_run"])
    assert adapters["lora_run"].tolist() == ["toy_sd3_sa1b", "toy_sd3_coco"]
    for row in adapters.itertuples():  # what the adapter folder records, and the bytes it holds now
        info = json.loads((workdir / f"results/magnet/{row.lora_run}/adapter/adapter.json").read_text())
        assert (row.lora_protocol, row.lora_iteration) == (info["protocol"], info["checkpoint"]["iteration"])
        assert json.loads(row.lora_recipe) == info["recipe"]
    main_table = pd.read_csv(workdir / tables / "main_table1_ovss.csv")
    magnet = main_table[main_table["paper_model"].str.contains("MAGNET")]
    assert sorted(magnet["model"].unique()) == ["toy_sd3_magnet_coco", "toy_sd3_magnet_sa1b"]
    # The + MAGNET rows are read where the SD3 row is (its analysis layer), whichever layer the runs supervised.
    sd3_layers = set(main_table.loc[main_table["model"] == "toy_sd3", "layer"])
    for row in magnet.itertuples():
        scores = pd.read_csv(workdir / f"results/segmentation/{row.model}/{row.dataset}/t8/per_layer.csv")
        assert {row.layer} == sd3_layers
        assert row.mIoU == pytest.approx(scores["mIoU"][row.layer], abs=0.005)  # 2 decimals
        assert (row.lora_run, row.lora_iteration) == (scores["lora_run"][row.layer], scores["lora_iteration"][row.layer])


@pytest.mark.slow
def test_the_default_run_shows_magnets_effect_and_the_magnet_rows(toy_run):
    check_magnet_outputs(toy_run)
