# Evaluation datasets: download (resumable, checksum-verified) and prepare into the common layout
# <data.root>/prepared/<name>/ (see docs/datasets.md). Targets: prepare_<name>, prepare_voc20 (the
# background: drop view of voc21) and prepare_all. MAGNET's training sets, prepare_coco_stuff171_train and
# prepare_sa1b_sa_000020 (SA-1B's tar is placed by hand), are not part of prepare_all.
#
# Config keys read: data.root; data.expected_counts.<name>; data.paths.<name> (folder of an existing raw copy: nothing is downloaded
# for it); data.source_overrides.<archive key>.{url, checksum} (mirrors; the tests use a local server).
# Archive keys, URLs and published checksums live in src/seg4diff_repro/datasets/sources.py.

from seg4diff_repro.datasets import sources as DS_SOURCES

DS_ROOT = Path(config["data"]["root"])
DS_DOWNLOADS = str(DS_ROOT / "downloads")
DS_PATHS = config["data"].get("paths") or {}
DS_OVERRIDES = config["data"].get("source_overrides") or {}
DS_COUNTS = config["data"].get("expected_counts") or {}

# Per dataset: where the raw data comes from, and the image count to expect where a subset replaces the release's.
DS_SOURCE_ARGS = {
    name: DS_SOURCES.rule_source_args(name, DS_DOWNLOADS, DS_PATHS, DS_OVERRIDES)
    + (f" --expected-count {DS_COUNTS[name]}" if name in DS_COUNTS else "")
    for name in (*DS_SOURCES.DATASET_NAMES, *DS_SOURCES.TRAINING_DATASET_NAMES)
}


wildcard_constraints:
    archive_file=DS_SOURCES.archive_filename_regex(),


rule download_dataset_archive:
    output:
        DS_ROOT / "downloads" / "{archive_file}",
    params:
        args=lambda wildcards: DS_SOURCES.rule_download_args(wildcards.archive_file, DS_OVERRIDES),
    message:
        "Downloading {wildcards.archive_file} (resumable, checksum-verified); writes {output}; progress in {log}"
    log:
        "logs/datasets/download_{archive_file}.log",
    benchmark:
        "results/benchmarks/datasets/download_{archive_file}.tsv"
    resources:
        mem_mb=500,
        disk_mb=lambda wildcards: DS_SOURCES.rule_download_disk_mb(wildcards.archive_file),
        downloads=1,
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro download {params.args} --dest {output:q} > {log:q} 2>&1"


rule prepare_voc21:
    input:
        DS_SOURCES.rule_archive_inputs("voc21", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "voc21" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "voc21",
        source=DS_SOURCE_ARGS["voc21"],
    message:
        "Preparing voc21 in the common layout (images, labels, splits, manifest); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_voc21.log",
    benchmark:
        "results/benchmarks/datasets/prepare_voc21.tsv"
    resources:
        mem_mb=2000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("voc21"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name voc21 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_coco_object:
    input:
        DS_SOURCES.rule_archive_inputs("coco_object", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "coco_object" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "coco_object",
        source=DS_SOURCE_ARGS["coco_object"],
    message:
        "Preparing coco_object in the common layout (images, labels, splits, manifest); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_coco_object.log",
    benchmark:
        "results/benchmarks/datasets/prepare_coco_object.tsv"
    resources:
        mem_mb=4000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("coco_object"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name coco_object --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_pc59:
    input:
        DS_SOURCES.rule_archive_inputs("pc59", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "pc59" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "pc59",
        source=DS_SOURCE_ARGS["pc59"],
    message:
        "Preparing pc59 in the common layout (images, labels, splits, manifest); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_pc59.log",
    benchmark:
        "results/benchmarks/datasets/prepare_pc59.tsv"
    resources:
        mem_mb=12000,  # trainval_merged.json is parsed whole
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("pc59"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name pc59 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_ade150:
    input:
        DS_SOURCES.rule_archive_inputs("ade150", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "ade150" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "ade150",
        source=DS_SOURCE_ARGS["ade150"],
    message:
        "Preparing ade150 in the common layout (images, labels, splits, manifest); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_ade150.log",
    benchmark:
        "results/benchmarks/datasets/prepare_ade150.tsv"
    resources:
        mem_mb=2000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("ade150"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name ade150 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_coco_stuff27:
    input:
        DS_SOURCES.rule_archive_inputs("coco_stuff27", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "coco_stuff27" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "coco_stuff27",
        source=DS_SOURCE_ARGS["coco_stuff27"],
    message:
        "Preparing coco_stuff27 in the common layout (images, labels, splits, manifest); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_coco_stuff27.log",
    benchmark:
        "results/benchmarks/datasets/prepare_coco_stuff27.tsv"
    resources:
        mem_mb=2000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("coco_stuff27"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name coco_stuff27 --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_cityscapes:
    input:
        DS_SOURCES.rule_archive_inputs("cityscapes", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "cityscapes" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "cityscapes",
        source=DS_SOURCE_ARGS["cityscapes"],
    message:
        "Preparing cityscapes in the common layout (images, labels, splits, manifest); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_cityscapes.log",
    benchmark:
        "results/benchmarks/datasets/prepare_cityscapes.tsv"
    resources:
        mem_mb=2000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("cityscapes"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name cityscapes --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_coco_stuff171_train:
    input:
        DS_SOURCES.rule_archive_inputs("coco_stuff171_train", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "coco_stuff171_train" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "coco_stuff171_train",
        source=DS_SOURCE_ARGS["coco_stuff171_train"],
    message:
        "Preparing MAGNET's COCO training set (the official 10,001 train2017 images, COCO-Stuff-171 labels); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_coco_stuff171_train.log",
    benchmark:
        "results/benchmarks/datasets/prepare_coco_stuff171_train.tsv"
    resources:
        mem_mb=2000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("coco_stuff171_train"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name coco_stuff171_train --out {params.out:q} {params.source} > {log:q} 2>&1"


rule prepare_sa1b_sa_000020:
    input:
        DS_SOURCES.rule_archive_inputs("sa1b_sa_000020", DS_DOWNLOADS, DS_PATHS),
    output:
        DS_ROOT / "prepared" / "sa1b_sa_000020" / "manifest.json",
    params:
        out=DS_ROOT / "prepared" / "sa1b_sa_000020",
        source=DS_SOURCE_ARGS["sa1b_sa_000020"],
    message:
        "Preparing MAGNET's SA-1B training set (sa_000020, images and masks halved, captions); writes {output}; progress in {log}"
    log:
        "logs/datasets/prepare_sa1b_sa_000020.log",
    benchmark:
        "results/benchmarks/datasets/prepare_sa1b_sa_000020.tsv"
    resources:
        mem_mb=4000,
        disk_mb=DS_SOURCES.rule_prepare_disk_mb("sa1b_sa_000020"),
    conda:
        "../../envs/datasets.yaml"
    shell:
        "seg4diff-repro prepare-dataset --name sa1b_sa_000020 --out {params.out:q} {params.source} > {log:q} 2>&1"


# VOC20 is the background: drop view of voc21 (SegmentationDataset(..., background="drop")).
rule prepare_voc20:
    input:
        rules.prepare_voc21.output,
    localrule: True


rule prepare_all:
    input:
        [DS_ROOT / "prepared" / name / "manifest.json" for name in DS_SOURCES.DATASET_NAMES],
        # the toy world's sets of the default config's views (rule prepare_toy_world)
        [DS_ROOT / "prepared" / f"toy_world_{preset}" / "manifest.json" for preset in ("objects", "crowd", "scenes", "stuff")],
    localrule: True
