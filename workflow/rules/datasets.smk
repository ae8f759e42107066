# Evaluation datasets: download (resumable, checksum-verified) and prepare into the common layout
# <data.root>/prepared/<name>/ (see docs/datasets.md). Targets: prepare_<name> and prepare_all.
#
# Config keys read: data.root, data.paths.<name> (existing raw copy: nothing is downloaded for it),
# data.source_overrides.<archive key>.{url, checksum} (mirrors; tests use a local server).

import importlib.util as _ds_importlib_util
import re as _ds_re
import shlex as _ds_shlex
import sys as _ds_sys
from pathlib import Path as _DsPath


def _ds_load_sources():
    """Load datasets/sources.py by path (stdlib only), so parsing needs no installed package."""
    path = _DsPath(str(workflow.current_basedir)) / "../../src/seg4diff_repro/datasets/sources.py"
    spec = _ds_importlib_util.spec_from_file_location("_seg4diff_repro_dataset_sources", path)
    loaded = _ds_importlib_util.module_from_spec(spec)
    _ds_sys.modules[spec.name] = loaded  # dataclasses look their module up here
    spec.loader.exec_module(loaded)
    return loaded


DS_SOURCES = _ds_load_sources()
DS_ROOT = _DsPath(config["data"]["root"])
DS_DOWNLOADS = DS_ROOT / "downloads"
DS_PATHS = config["data"].get("paths") or {}
DS_OVERRIDES = config["data"].get("source_overrides") or {}


def _ds_quote(value):
    return _ds_shlex.quote(str(value))


def _ds_download_args(wildcards):
    """--archive KEY plus the mirror URL / checksum of data.source_overrides.<KEY>, if any."""
    key = DS_SOURCES.archive_by_filename(wildcards.archive_file).key
    override = DS_OVERRIDES.get(key) or {}
    args = ["--archive", key]
    if override.get("url"):
        args += ["--url", override["url"]]
    if override.get("checksum"):
        args += ["--checksum", override["checksum"]]
    return " ".join(_ds_quote(a) for a in args)


def _ds_disk_mb(wildcards):
    return int(DS_SOURCES.archive_by_filename(wildcards.archive_file).size_gb * 1100) + 100


def _ds_archive_inputs(name):
    """The dataset's archives, or nothing when data.paths.<name> points at an existing copy."""
    if name in DS_PATHS:
        return []
    return [DS_DOWNLOADS / archive.filename for archive in DS_SOURCES.archives_for(name)]


def _ds_source_args(name):
    if name in DS_PATHS:
        return "--source-dir " + _ds_quote(DS_PATHS[name])
    args = ["--downloads-dir", str(DS_DOWNLOADS)]
    for archive in DS_SOURCES.archives_for(name):
        checksum = (DS_OVERRIDES.get(archive.key) or {}).get("checksum")
        if checksum:
            args += ["--checksum", f"{archive.key}={checksum}"]
    return " ".join(_ds_quote(a) for a in args)


def _ds_manifest(name):
    return DS_ROOT / "prepared" / name / "manifest.json"


def _ds_disk_prepare(name):
    spec = DS_SOURCES.DATASETS[name]
    return int((spec.extract_gb + spec.prepared_gb) * 1100) + 100


wildcard_constraints:
    archive_file="|".join(_ds_re.escape(a.filename) for a in DS_SOURCES.ARCHIVES.values()),


rule download_dataset_archive:
    output:
        DS_DOWNLOADS / "{archive_file}",
    params:
        args=_ds_download_args,
    log:
        "logs/datasets/download_{archive_file}.log",
    benchmark:
        "benchmarks/datasets/download_{archive_file}.tsv"
    resources:
        mem_mb=500,
        disk_mb=_ds_disk_mb,
        downloads=1,
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro download {params.args} --dest {output:q} > {log:q} 2>&1"


rule prepare_voc21:
    input:
        _ds_archive_inputs("voc21"),
    output:
        _ds_manifest("voc21"),
    params:
        out=lambda wildcards, output: _DsPath(output[0]).parent,
        source=_ds_source_args("voc21"),
    log:
        "logs/datasets/prepare_voc21.log",
    benchmark:
        "benchmarks/datasets/prepare_voc21.tsv"
    resources:
        mem_mb=2000,
        disk_mb=_ds_disk_prepare("voc21"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name voc21 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_coco_object:
    input:
        _ds_archive_inputs("coco_object"),
    output:
        _ds_manifest("coco_object"),
    params:
        out=lambda wildcards, output: _DsPath(output[0]).parent,
        source=_ds_source_args("coco_object"),
    log:
        "logs/datasets/prepare_coco_object.log",
    benchmark:
        "benchmarks/datasets/prepare_coco_object.tsv"
    resources:
        mem_mb=4000,
        disk_mb=_ds_disk_prepare("coco_object"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name coco_object --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_pc59:
    input:
        _ds_archive_inputs("pc59"),
    output:
        _ds_manifest("pc59"),
    params:
        out=lambda wildcards, output: _DsPath(output[0]).parent,
        source=_ds_source_args("pc59"),
    log:
        "logs/datasets/prepare_pc59.log",
    benchmark:
        "benchmarks/datasets/prepare_pc59.tsv"
    resources:
        mem_mb=12000,  # trainval_merged.json is parsed whole
        disk_mb=_ds_disk_prepare("pc59"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name pc59 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_ade150:
    input:
        _ds_archive_inputs("ade150"),
    output:
        _ds_manifest("ade150"),
    params:
        out=lambda wildcards, output: _DsPath(output[0]).parent,
        source=_ds_source_args("ade150"),
    log:
        "logs/datasets/prepare_ade150.log",
    benchmark:
        "benchmarks/datasets/prepare_ade150.tsv"
    resources:
        mem_mb=2000,
        disk_mb=_ds_disk_prepare("ade150"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name ade150 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_coco_stuff27:
    input:
        _ds_archive_inputs("coco_stuff27"),
    output:
        _ds_manifest("coco_stuff27"),
    params:
        out=lambda wildcards, output: _DsPath(output[0]).parent,
        source=_ds_source_args("coco_stuff27"),
    log:
        "logs/datasets/prepare_coco_stuff27.log",
    benchmark:
        "benchmarks/datasets/prepare_coco_stuff27.tsv"
    resources:
        mem_mb=2000,
        disk_mb=_ds_disk_prepare("coco_stuff27"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name coco_stuff27 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_cityscapes:
    input:
        _ds_archive_inputs("cityscapes"),
    output:
        _ds_manifest("cityscapes"),
    params:
        out=lambda wildcards, output: _DsPath(output[0]).parent,
        source=_ds_source_args("cityscapes"),
    log:
        "logs/datasets/prepare_cityscapes.log",
    benchmark:
        "benchmarks/datasets/prepare_cityscapes.tsv"
    resources:
        mem_mb=2000,
        disk_mb=_ds_disk_prepare("cityscapes"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name cityscapes --out {params.out:q} {params.source} > {log:q} 2>&1"


# VOC20 is the drop_background view of voc21: nothing of its own to prepare.
rule prepare_voc20:
    input:
        _ds_manifest("voc21"),
    localrule: True


rule prepare_all:
    input:
        [_ds_manifest(name) for name in DS_SOURCES.DATASET_NAMES],
        _ds_manifest("toy_shapes"),
    localrule: True
