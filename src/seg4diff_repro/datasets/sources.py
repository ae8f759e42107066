"""Where every dataset comes from: URLs, archive names, published checksums, counts, disk sizes.

The evaluation datasets, and MAGNET's two training sets (``TRAINING_DATASET_NAMES``: COCO-Stuff-171 on the
official 10,001-image list, and SA-1B's ``sa_000020`` shard with the official captions).

This module is deliberately standard-library only: ``workflow/rules/datasets.smk`` loads it by file path
(without importing the package) to name the download jobs.

Checksums are the values *published* by well-known public dataset loaders (each entry cites where); they are
verified after every download and before every preparation. Sizes are the published archive sizes
(approximate, for the disk-budget table in ``docs/datasets.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Prepared-dataset names handled here (``toy_shapes`` is generated, not downloaded; ``voc20`` is a view of
#: ``voc21``: the reader's ``background="drop"``).
DATASET_NAMES = ("voc21", "coco_object", "pc59", "ade150", "coco_stuff27", "cityscapes")
#: MAGNET's training sets (docs/method.md#magnet), prepared by the same machinery but not part of ``prepare_all``:
#: SA-1B needs a licence accepted by hand.
TRAINING_DATASET_NAMES = ("coco_stuff171_train", "sa1b_sa_000020")
#: Target aliases: ``prepare_<alias>`` builds the dataset it points to.
ALIASES = {"voc20": "voc21"}


@dataclass(frozen=True)
class Archive:
    """One file to fetch (or, for login-only sources, to be supplied by the user)."""

    key: str
    filename: str
    urls: tuple[str, ...]
    #: ("md5" | "sha1" | "sha256", hex digest) as published, or None where no checksum is published.
    checksum: tuple[str, str] | None
    checksum_source: str
    size_gb: float
    login_required: bool = False
    #: Printed when a login-only archive is missing, or a download failed: where to get it and where to put it.
    instructions: str = ""
    #: For a file of a git repository: its blob id in the pinned commit's tree (sha1 of "blob <size>\\0" + content),
    #: which preparation checks; it holds even where no digest of the content itself is known.
    git_blob: str | None = None


@dataclass(frozen=True)
class DatasetSource:
    name: str
    title: str
    archives: tuple[str, ...]
    split: str
    expected_count: int | None
    #: Approximate disk use in GB: downloads (shared archives counted for each user), peak temporary
    #: extraction, and the prepared folder.
    download_gb: float
    extract_gb: float
    prepared_gb: float
    #: What a folder given as ``data.paths.<name>`` must contain (relative paths, globs allowed).
    raw_layout: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


_CITYSCAPES_HELP = (
    "Cityscapes needs a (free) login, so it is never downloaded automatically.\n"
    "  1. Register and log in at https://www.cityscapes-dataset.com/login/\n"
    "  2. From https://www.cityscapes-dataset.com/downloads/ download\n"
    "       gtFine_trainvaltest.zip       (packageID=1, 241 MB)\n"
    "       leftImg8bit_trainvaltest.zip  (packageID=3, 11 GB)\n"
    "  3. Put both files, unrenamed, in {downloads_dir}/\n"
    "     -- or set data.paths.cityscapes to a folder that already holds the extracted\n"
    "        gtFine/val/<city>/*_gtFine_labelIds.png and leftImg8bit/val/<city>/*_leftImg8bit.png\n"
    "  4. Re-run: snakemake prepare_cityscapes"
)

#: The official Seg4Diff repository at the commit the method spec cites; its caption files are downloaded from
#: this commit, so their content cannot move.
SEG4DIFF_COMMIT = "bb500cac850c86840d3bb733443bea5939763e20"
SEG4DIFF_RAW = f"https://raw.githubusercontent.com/cvlab-kaist/Seg4Diff/{SEG4DIFF_COMMIT}"

_SA1B_HELP = (
    "SA-1B is distributed under a licence that must be accepted by hand, so it is never downloaded automatically.\n"
    "  1. Accept the SA-1B licence at https://ai.meta.com/datasets/segment-anything-downloads/ and download the\n"
    "     links file it offers (the links are signed and expire).\n"
    "  2. Download sa_000020.tar (about 11 GB; the only shard the official MAGNET training uses) from its line of\n"
    "     that file.\n"
    "  3. Put it, unrenamed, in {downloads_dir}/\n"
    "     -- or set data.paths.sa1b_sa_000020 to a folder that already holds the extracted sa_*.jpg and\n"
    "        sa_*.json files (and train_caption_sa1b.json).\n"
    "  4. Re-run: snakemake prepare_sa1b_sa_000020\n"
    "  Meta publishes no checksum: the sha256 of the file you placed is recorded on first use (in\n"
    "  sa_000020.tar.verified and the prepared manifest); pin it with\n"
    "  data.source_overrides.sa1b_sa_000020.checksum."
)

_SA1B_CAPTIONS_HELP = (
    "If the download keeps failing, fetch the file by hand from\n"
    f"  {SEG4DIFF_RAW}/datasets/captions/train_caption_sa1b.json\n"
    "  (the official repository, github.com/cvlab-kaist/Seg4Diff, at commit {SEG4DIFF_COMMIT_SHORT})\n"
    "and put it, unrenamed, in {downloads_dir}/"
).replace("{SEG4DIFF_COMMIT_SHORT}", SEG4DIFF_COMMIT[:7])

ARCHIVES: dict[str, Archive] = {
    a.key: a
    for a in (
        Archive(
            key="voc2012_trainval",
            filename="VOCtrainval_11-May-2012.tar",
            urls=(
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "https://pjreddie.com/media/files/VOCtrainval_11-May-2012.tar",
            ),
            checksum=("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
            checksum_source="torchvision.datasets.VOCSegmentation (DATASET_YEAR_DICT['2012'])",
            size_gb=2.0,
        ),
        Archive(
            key="voc2010_trainval",
            filename="VOCtrainval_03-May-2010.tar",
            urls=("http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",),
            checksum=("md5", "da459979d0c395079b5c75ee67908abb"),
            checksum_source="torchvision.datasets.VOCSegmentation (DATASET_YEAR_DICT['2010'])",
            size_gb=1.3,
        ),
        Archive(
            key="pascal_context_trainval_merged",
            filename="trainval_merged.json",
            urls=("https://codalabuser.blob.core.windows.net/public/trainval_merged.json",),
            checksum=("sha1", "169325d9f7e9047537fedca7b04de4dddf10b881"),
            checksum_source="PyTorch-Encoding / GluonCV scripts/prepare_pcontext.py (Detail-API json)",
            size_gb=0.6,  # not published; estimate
        ),
        Archive(
            key="ade20k_challenge",
            filename="ADEChallengeData2016.zip",
            urls=("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
            checksum=("sha1", "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),
            checksum_source="GluonCV scripts/datasets/ade20k.py; Segmenter prepare_ade20k.py",
            size_gb=0.92,
        ),
        Archive(
            key="coco_val2017_images",
            filename="val2017.zip",
            urls=("http://images.cocodataset.org/zips/val2017.zip",),
            checksum=("sha1", "4950dc9d00dbe1c933ee0170f5797584351d2a41"),
            checksum_source="GluonCV scripts/datasets/mscoco.py (also its docs' download table)",
            size_gb=0.78,
        ),
        Archive(
            key="coco_annotations_trainval2017",
            filename="annotations_trainval2017.zip",
            urls=("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",),
            checksum=("sha1", "8551ee4bb5860311e79dace7e79cb91e432e78b3"),
            checksum_source="GluonCV scripts/datasets/mscoco.py (also its docs' download table)",
            size_gb=0.24,
        ),
        Archive(
            key="cocostuff_stuffthingmaps_trainval2017",
            filename="stuffthingmaps_trainval2017.zip",
            urls=(
                "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                "stuffthingmaps_trainval2017.zip",
            ),
            checksum=None,
            checksum_source=(
                "none published (github.com/nightrome/cocostuff lists only the size, 659 MB): the sha256 "
                "is recorded on first download (trust on first use) and in the manifest; pin it with "
                "data.source_overrides.cocostuff_stuffthingmaps_trainval2017.checksum"
            ),
            size_gb=0.66,
        ),
        Archive(
            key="coco_train2017_images",
            filename="train2017.zip",
            urls=("http://images.cocodataset.org/zips/train2017.zip",),
            checksum=("sha1", "10ad623668ab00c62c096f0ed636d6aff41faca5"),
            checksum_source="GluonCV scripts/datasets/mscoco.py (also its docs' download table)",
            size_gb=18.0,
        ),
        Archive(
            key="seg4diff_train_caption_coco",
            filename="train_caption_coco.json",
            urls=(f"{SEG4DIFF_RAW}/datasets/captions/train_caption_coco.json",),
            checksum=("sha256", "cee34614258ae6745f382fc7724b4dba3abaeb6796bd314da477018f6d4040a1"),
            checksum_source=f"computed from the official repository's file at commit {SEG4DIFF_COMMIT[:7]} (3,000,796 bytes)",
            size_gb=0.003,
            git_blob="b78d764680736f388e7cf39a4773c17d496fe66d",
        ),
        Archive(
            key="sa1b_sa_000020",
            filename="sa_000020.tar",
            urls=("https://ai.meta.com/datasets/segment-anything-downloads/",),
            checksum=None,
            checksum_source=(
                "none published by Meta: the sha256 of the placed file is recorded on first use (trust on first "
                "use) and in the manifest; pin it with data.source_overrides.sa1b_sa_000020.checksum"
            ),
            size_gb=11.0,
            login_required=True,
            instructions=_SA1B_HELP,
        ),
        Archive(
            key="seg4diff_train_caption_sa1b",
            filename="train_caption_sa1b.json",
            urls=(f"{SEG4DIFF_RAW}/datasets/captions/train_caption_sa1b.json",),
            checksum=None,
            checksum_source=(
                f"no content digest known (the stored snapshot of the official repository lists the file at commit "
                f"{SEG4DIFF_COMMIT[:7]} but lacks its content): the sha256 is recorded on first use, and preparation "
                "checks the file against its git blob id in that commit's tree"
            ),
            git_blob="c272a0a82d9b56c8bd2060cbef7b6439fed7dd27",
            size_gb=0.01,  # not known; the COCO caption file of the same release is 3 MB
            instructions=_SA1B_CAPTIONS_HELP,
        ),
        Archive(
            key="cityscapes_gtfine_trainvaltest",
            filename="gtFine_trainvaltest.zip",
            urls=("https://www.cityscapes-dataset.com/file-handling/?packageID=1",),
            checksum=("sha1", "99f532cb1af174f5fcc4c5bc8feea8c66246ddbc"),
            checksum_source="Segmenter (rstrudel/segmenter) segm/scripts/prepare_cityscapes.py",
            size_gb=0.24,
            login_required=True,
            instructions=_CITYSCAPES_HELP,
        ),
        Archive(
            key="cityscapes_leftimg8bit_trainvaltest",
            filename="leftImg8bit_trainvaltest.zip",
            urls=("https://www.cityscapes-dataset.com/file-handling/?packageID=3",),
            checksum=("sha1", "2c0b77ce9933cc635adda307fbba5566f5d9d404"),
            checksum_source="Segmenter (rstrudel/segmenter) segm/scripts/prepare_cityscapes.py",
            size_gb=11.0,
            login_required=True,
            instructions=_CITYSCAPES_HELP,
        ),
    )
}

DATASETS: dict[str, DatasetSource] = {
    d.name: d
    for d in (
        DatasetSource(
            name="voc21",
            title="PASCAL VOC 2012 val, 21 classes (background = 0); VOC20 is its background: drop view",
            archives=("voc2012_trainval",),
            split="val",
            expected_count=1449,
            download_gb=2.0,
            extract_gb=0.2,
            prepared_gb=0.15,
            raw_layout=(
                "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
                "VOCdevkit/VOC2012/JPEGImages/<id>.jpg",
                "VOCdevkit/VOC2012/SegmentationClass/<id>.png",
            ),
        ),
        DatasetSource(
            name="coco_object",
            title="COCO-Object: COCO 2017 val, 80 things + background (0), from instance masks",
            archives=("coco_val2017_images", "coco_annotations_trainval2017"),
            split="val",
            expected_count=5000,
            download_gb=1.02,
            extract_gb=0.85,
            prepared_gb=0.85,
            raw_layout=("val2017/<id>.jpg", "annotations/instances_val2017.json"),
        ),
        DatasetSource(
            name="pc59",
            title="PASCAL-Context-59: VOC2010 val with the 59 most frequent context classes",
            archives=("voc2010_trainval", "pascal_context_trainval_merged"),
            split="val",
            expected_count=5105,
            download_gb=1.9,
            extract_gb=0.6,
            prepared_gb=0.55,
            raw_layout=("VOCdevkit/VOC2010/JPEGImages/<id>.jpg", "trainval_merged.json (or VOCdevkit/VOC2010/...)"),
        ),
        DatasetSource(
            name="ade150",
            title="ADE20K-150 (SceneParsing ADEChallengeData2016) val",
            archives=("ade20k_challenge",),
            split="val",
            expected_count=2000,
            download_gb=0.92,
            extract_gb=0.25,
            prepared_gb=0.25,
            raw_layout=(
                "ADEChallengeData2016/images/validation/<id>.jpg",
                "ADEChallengeData2016/annotations/validation/<id>.png",
            ),
        ),
        DatasetSource(
            name="coco_stuff27",
            title="COCO-Stuff-27 (PiCIE/STEGO coarse classes), all COCO 2017 val images",
            archives=("coco_val2017_images", "cocostuff_stuffthingmaps_trainval2017"),
            split="val",
            expected_count=5000,
            download_gb=1.44,
            extract_gb=0.85,
            prepared_gb=0.85,
            raw_layout=(
                "val2017/<id>.jpg (or images/val2017/)",
                "stuffthingmaps_trainval2017/val2017/<id>.png (or annotations/val2017/ or val2017/<id>.png)",
            ),
            notes=("[assumption] all 5000 val2017 images (STEGO evaluates a curated 2175-image subset)",),
        ),
        DatasetSource(
            name="cityscapes",
            title="Cityscapes fine val, 19 trainIds",
            archives=("cityscapes_gtfine_trainvaltest", "cityscapes_leftimg8bit_trainvaltest"),
            split="val",
            expected_count=500,
            download_gb=11.24,
            extract_gb=1.2,
            prepared_gb=0.35,
            raw_layout=(
                "leftImg8bit/val/<city>/<id>_leftImg8bit.png",
                "gtFine/val/<city>/<id>_gtFine_labelIds.png",
            ),
        ),
        DatasetSource(
            name="coco_stuff171_train",
            title=(
                "MAGNET COCO training set: the 10,001 COCO train2017 images of the official "
                "train_caption_coco.json, with COCO-Stuff-171 labels"
            ),
            archives=("coco_train2017_images", "cocostuff_stuffthingmaps_trainval2017", "seg4diff_train_caption_coco"),
            split="train",
            expected_count=10001,
            download_gb=18.7,
            extract_gb=1.7,
            prepared_gb=1.7,
            raw_layout=(
                "train2017/<id>.jpg (or images/train2017/)",
                "stuffthingmaps_trainval2017/train2017/<id>.png (or annotations/train2017/ or train2017/<id>.png)",
                "train_caption_coco.json (or datasets/captions/train_caption_coco.json)",
            ),
        ),
        DatasetSource(
            name="sa1b_sa_000020",
            title="MAGNET SA-1B training set: the sa_000020 shard, images and masks halved, with the official captions",
            archives=("sa1b_sa_000020", "seg4diff_train_caption_sa1b"),
            split="train",
            # Meta publishes no per-shard count; set data.expected_counts.sa1b_sa_000020 to check one.
            expected_count=None,
            download_gb=11.0,
            extract_gb=0.0,  # members are read from the tar, not extracted
            prepared_gb=3.5,
            raw_layout=(
                "sa_<n>.jpg and sa_<n>.json side by side (or images/sa_000020/ and annotations/sa_000020/)",
                "train_caption_sa1b.json (or datasets/captions/train_caption_sa1b.json)",
            ),
            notes=(
                "[assumption] images halved with PIL bilinear and masks with nearest (shorter side 750, as the "
                "official datasets/README says; its resizing code is not released)",
            ),
        ),
    )
}


def resolve_name(name: str) -> str:
    """Map a target alias (``voc20``) to the prepared dataset it is a view of."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        known = sorted([*DATASETS, *ALIASES])
        raise KeyError(f"unknown dataset {name!r}; known: {known}")
    return name


def archives_for(name: str) -> list[Archive]:
    return [ARCHIVES[k] for k in DATASETS[resolve_name(name)].archives]


def archive_by_filename(filename: str) -> Archive:
    for a in ARCHIVES.values():
        if a.filename == filename:
            return a
    raise KeyError(f"no archive named {filename!r}; known: {sorted(a.filename for a in ARCHIVES.values())}")


def parse_checksum(text: str) -> tuple[str, str]:
    """``"sha256:abc…"`` -> ("sha256", "abc…"); the algorithm must be md5, sha1 or sha256."""
    algo, sep, digest = text.partition(":")
    algo = algo.strip().lower()
    digest = digest.strip().lower()
    lengths = {"md5": 32, "sha1": 40, "sha256": 64}
    if not sep or algo not in lengths or len(digest) != lengths[algo] or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum must look like 'md5:<32 hex>', 'sha1:<40 hex>' or 'sha256:<64 hex>', got {text!r}")
    return algo, digest


# ---------------------------------------------------------------------------
# Helpers for workflow/rules/datasets.smk (kept here so the rule file holds rules only)
# ---------------------------------------------------------------------------


def _quote(value: object) -> str:
    import shlex

    return shlex.quote(str(value))


def rule_download_args(filename: str, overrides: dict | None) -> str:
    """``--archive KEY`` plus ``--url``/``--checksum`` from ``data.source_overrides.<KEY>``, shell-quoted."""
    key = archive_by_filename(filename).key
    override = (overrides or {}).get(key) or {}
    args = ["--archive", key]
    if override.get("url"):
        args += ["--url", override["url"]]
    if override.get("checksum"):
        args += ["--checksum", override["checksum"]]
    return " ".join(_quote(a) for a in args)


def rule_archive_inputs(name: str, downloads_dir: str, paths: dict | None) -> list[str]:
    """The dataset's archive paths, or none when ``data.paths.<name>`` names an existing copy."""
    if name in (paths or {}):
        return []
    return [f"{downloads_dir}/{a.filename}" for a in archives_for(name)]


def rule_source_args(name: str, downloads_dir: str, paths: dict | None, overrides: dict | None) -> str:
    """``--source-dir DIR`` for an existing copy, else ``--downloads-dir`` and checksum overrides."""
    if name in (paths or {}):
        return "--source-dir " + _quote(paths[name])
    args = ["--downloads-dir", downloads_dir]
    for archive in archives_for(name):
        checksum = ((overrides or {}).get(archive.key) or {}).get("checksum")
        if checksum:
            args += ["--checksum", f"{archive.key}={checksum}"]
    return " ".join(_quote(a) for a in args)


def rule_download_disk_mb(filename: str) -> int:
    return int(archive_by_filename(filename).size_gb * 1100) + 100


def rule_prepare_disk_mb(name: str) -> int:
    spec = DATASETS[resolve_name(name)]
    return int((spec.extract_gb + spec.prepared_gb) * 1100) + 100


def archive_filename_regex() -> str:
    """Wildcard constraint matching exactly the published archive file names."""
    import re

    return "|".join(re.escape(a.filename) for a in ARCHIVES.values())
