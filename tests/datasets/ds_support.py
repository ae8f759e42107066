"""Test support for the dataset tests: a local HTTP server (127.0.0.1, port 0, Range-capable, can cut a transfer once) and small archives built
with the real member layout of each dataset's published release."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # next GET sends half the body, then drops the connection
    fail: dict[str, list[int]] = field(default_factory=dict)  # statuses to answer before serving normally
    ignore_range: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range header, status)
    lock: threading.Lock = field(default_factory=threading.Lock)


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a server thread for long
    state: ServerState

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _record(self, path: str, status: int) -> None:
        with self.state.lock:
            self.state.requests.append((path, self.headers.get("Range"), status))

    def _simple(self, path: str, status: int, headers: dict[str, str] | None = None) -> None:
        self._record(path, status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        st = self.state
        with st.lock:
            data = st.files.get(path)
            fail = st.fail.get(path)
            status_override = fail.pop(0) if fail else None
            cut = path in st.cut_once
            st.cut_once.discard(path)
        if data is None:
            return self._simple(path, 404)
        if status_override is not None:
            return self._simple(path, status_override)
        total = len(data)
        start, end, status = 0, total - 1, 200
        rng = self.headers.get("Range")
        if rng and path not in st.ignore_range:
            m = _RANGE.match(rng.strip())
            if not m:
                return self._simple(path, 400)
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
            if start >= total:
                return self._simple(path, 416, {"Content-Range": f"bytes */{total}"})
            status = 206
        body = data[start : end + 1]
        self._record(path, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class LocalServer:
    def __init__(self) -> None:
        self.state = ServerState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, name: str, data: bytes) -> str:
        self.state.files[f"/{name}"] = data
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def gets(self, name: str) -> list[tuple[str | None, int]]:
        return [(r, s) for p, r, s in self.state.requests if p == f"/{name}"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def sha256(data: bytes) -> tuple[str, str]:
    return "sha256", hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Small files
# ---------------------------------------------------------------------------

W, H = 12, 8  # image size used everywhere (W x H)


def jpeg(seed: int, size: tuple[int, int] = (W, H), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_rgb(seed: int, size: tuple[int, int] = (W, H)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_index(label: np.ndarray, mode: str = "P") -> bytes:
    im = Image.fromarray(label.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = set()
        for name in members:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def label_with(values: list[int]) -> np.ndarray:
    """An HxW label whose columns cycle through ``values``."""
    cols = np.array([values[i % len(values)] for i in range(W)], dtype=np.int64)
    return np.tile(cols, (H, 1))


# ---------------------------------------------------------------------------
# Archives with the real member layouts
# ---------------------------------------------------------------------------

VOC_VAL = ["2007_000033", "2007_000042", "2007_000061"]
VOC_TRAIN = ["2007_000032"]


def voc2012_tar(bad_label: int | None = None) -> bytes:
    root = "VOCdevkit/VOC2012"
    m: dict[str, bytes] = {
        f"{root}/ImageSets/Segmentation/val.txt": "".join(f"{i}\n" for i in VOC_VAL).encode(),
        f"{root}/ImageSets/Segmentation/train.txt": "".join(f"{i}\n" for i in VOC_TRAIN).encode(),
        f"{root}/ImageSets/Segmentation/trainval.txt": "".join(f"{i}\n" for i in VOC_TRAIN + VOC_VAL).encode(),
    }
    for k, i in enumerate(VOC_TRAIN + VOC_VAL):
        m[f"{root}/JPEGImages/{i}.jpg"] = jpeg(k)
        m[f"{root}/Annotations/{i}.xml"] = b"<annotation/>"
        values = [0, 15, 255, k + 1]
        if bad_label is not None and i == VOC_VAL[1]:
            values = [0, bad_label]
        m[f"{root}/SegmentationClass/{i}.png"] = png_index(label_with(values))
        m[f"{root}/SegmentationObject/{i}.png"] = png_index(label_with([0, 1]))
    return tar_bytes(m)


COCO_IMAGES = [(139, "000000000139.jpg"), (285, "000000000285.jpg"), (632, "000000000632.jpg")]


def coco_zips() -> dict[str, bytes]:
    from seg4diff_repro.datasets.prepare import load_class_info

    info = load_class_info("coco_object")
    cats = [{"id": cid, "name": n, "supercategory": "x"} for cid, n in zip(info["coco_category_ids"], info["names"][1:])]
    images = [{"id": i, "file_name": f, "height": H, "width": W} for i, f in COCO_IMAGES]
    from pycocotools import mask as mask_utils

    crowd = np.zeros((H, W), dtype=np.uint8, order="F")
    crowd[4:8, 8:12] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    rle["counts"] = rle["counts"].decode()
    anns = [
        # large person covering the left half; small dog (id 18) on top of it
        {"id": 1, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 48.0,
         "segmentation": [[0, 0, 6, 0, 6, 8, 0, 8]], "bbox": [0, 0, 6, 8]},
        {"id": 2, "image_id": 139, "category_id": 18, "iscrowd": 0, "area": 4.0,
         "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "bbox": [1, 1, 2, 2]},
        {"id": 3, "image_id": 285, "category_id": 90, "iscrowd": 1, "area": 16.0, "segmentation": rle,
         "bbox": [8, 4, 4, 4]},
    ]
    instances = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}
    val = {f"val2017/{f}": jpeg(i, mode="L" if i == 632 else "RGB") for i, f in COCO_IMAGES}
    ann = {
        "annotations/instances_val2017.json": json.dumps(instances).encode(),
        "annotations/captions_val2017.json": b"{}",
        "annotations/instances_train2017.json": b"{}",
    }
    return {"val2017.zip": zip_bytes(val), "annotations_trainval2017.zip": zip_bytes(ann)}


PC_IMAGES = [(2008000002, "2008_000002.jpg", "val"), (2008000003, "2008_000003.jpg", "val"),
             (2008000008, "2008_000008.jpg", "train")]


def pascal_context_files() -> dict[str, bytes]:
    from pycocotools import mask as mask_utils

    def rle(mask: np.ndarray) -> dict:
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": r["size"], "counts": r["counts"].decode()}

    left = np.zeros((H, W), dtype=np.uint8)
    left[:, :6] = 1
    top = np.zeros((H, W), dtype=np.uint8)
    top[:2, :] = 1
    images, annos = [], []
    for k, (iid, fname, phase) in enumerate(PC_IMAGES):
        images.append({"image_id": iid, "file_name": fname, "phase": phase, "height": H, "width": W})
        # 2 = aeroplane (pc59 index 0), 360 = sky (index 46), 1 = accordion (not in the 59 -> 255)
        annos.append({"id": 3 * k + 1, "image_id": iid, "category_id": 2, "segmentation": rle(left), "area": 48})
        annos.append({"id": 3 * k + 2, "image_id": iid, "category_id": 360, "segmentation": rle(top), "area": 24})
        annos.append({"id": 3 * k + 3, "image_id": iid, "category_id": 1,
                      "segmentation": rle(np.eye(H, W, dtype=np.uint8)[::-1] * 0), "area": 0})
    detail = {"info": {}, "images": images, "annos_segmentation": annos, "categories": [],
              "annos_occlusion": [], "annos_joints": [], "parts": []}
    root = "VOCdevkit/VOC2010"
    tar = {f"{root}/JPEGImages/{f}": jpeg(k) for k, (_, f, _) in enumerate(PC_IMAGES)}
    tar[f"{root}/ImageSets/Main/val.txt"] = b"2008_000002\n2008_000003\n"
    tar[f"{root}/JPEGImages/2009_000001.jpg"] = jpeg(9)  # not in Pascal-Context val
    return {"VOCtrainval_03-May-2010.tar": tar_bytes(tar), "trainval_merged.json": json.dumps(detail).encode()}


ADE_VAL = ["ADE_val_00000001", "ADE_val_00000002"]


def ade_zip(bad_label: int | None = None) -> bytes:
    root = "ADEChallengeData2016"
    m = {f"{root}/objectInfo150.txt": b"Idx\tRatio\n", f"{root}/sceneCategories.txt": b""}
    m[f"{root}/images/training/ADE_train_00000001.jpg"] = jpeg(50)
    m[f"{root}/annotations/training/ADE_train_00000001.png"] = png_index(label_with([1]), mode="L")
    for k, i in enumerate(ADE_VAL):
        m[f"{root}/images/validation/{i}.jpg"] = jpeg(k)
        values = [0, 1, 150, 8] if bad_label is None else [0, bad_label]
        m[f"{root}/annotations/validation/{i}.png"] = png_index(label_with(values), mode="L")
    return zip_bytes(m)


def stuffthingmaps_zip() -> bytes:
    m = {"train2017/000000000009.png": png_index(label_with([0]), mode="L")}
    for i, f in COCO_IMAGES:
        # 0 person -> 9, 91 banner -> 17 textile, 156 sky-other -> 23, 255 unlabeled
        m[f"val2017/{Path(f).stem}.png"] = png_index(label_with([0, 91, 156, 255]), mode="L")
    return zip_bytes(m)


CITY_VAL = [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")]


def cityscapes_zips(n: int | None = None) -> dict[str, bytes]:
    """gtFine/leftImg8bit zips; ``n`` val images spread over three cities (default: CITY_VAL)."""
    cities = ("frankfurt", "lindau", "munster")
    val = CITY_VAL if n is None else [(cities[k % 3], f"{cities[k % 3]}_000000_{k:06d}") for k in range(n)]
    gt = {"README": b"gtFine", "license.txt": b"license"}
    left = {"README": b"leftImg8bit", "license.txt": b"license"}
    for k, (city, i) in enumerate(val):
        base = f"gtFine/val/{city}/{i}_gtFine"
        gt[f"{base}_labelIds.png"] = png_index(label_with([7, 26, 0, 33, 5]), mode="L")
        gt[f"{base}_color.png"] = png_rgb(k)
        gt[f"{base}_instanceIds.png"] = png_index(label_with([0]), mode="L")
        gt[f"{base}_polygons.json"] = b"{}"
        left[f"leftImg8bit/val/{city}/{i}_leftImg8bit.png"] = png_rgb(k)
    gt["gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"] = png_index(label_with([7]), mode="L")
    left["leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"] = png_rgb(9)
    left["leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png"] = png_rgb(8)
    return {"gtFine_trainvaltest.zip": zip_bytes(gt), "leftImg8bit_trainvaltest.zip": zip_bytes(left)}


def dataset_files(name: str) -> dict[str, bytes]:
    """Published file name -> bytes, for every archive the dataset needs."""
    if name == "voc21":
        return {"VOCtrainval_11-May-2012.tar": voc2012_tar()}
    if name == "coco_object":
        return coco_zips()
    if name == "pc59":
        return pascal_context_files()
    if name == "ade150":
        return {"ADEChallengeData2016.zip": ade_zip()}
    if name == "coco_stuff27":
        return {"val2017.zip": coco_zips()["val2017.zip"], "stuffthingmaps_trainval2017.zip": stuffthingmaps_zip()}
    if name == "cityscapes":
        return cityscapes_zips()
    raise KeyError(name)


EXPECTED = {"voc21": 3, "coco_object": 3, "pc59": 2, "ade150": 2, "coco_stuff27": 3, "cityscapes": 2}
