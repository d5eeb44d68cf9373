"""data.py at its edges (issue 18): bad data is a named bad sample or a one-line typed error, never wrong data, a
traceback, a hang or gigabytes of memory; a file changed after the scan is named."""

import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import PROCESSOR, label_folder, noise, rect, scanned, skipped, uncompressed_rle

from sam_split.tools import data
from sam_split.tools.cli import ToolError, run_tool
from sam_split.tools.data import DataChanged, DataError, DataOptions, open_source, scan


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height RGB pixels but holds none: only opening it lazily is cheap."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def mask_folder(root: Path, names=("a",), size=64) -> Path:
    """DIR/images/<name>.png with one good mask DIR/masks/<name>_0.png each."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        noise(size, size).save(root / "images" / f"{name}.png")
        Image.fromarray(rect(size, size, 10, 10, 40, 40).astype(np.uint8) * 255).save(root / "masks" / f"{name}_0.png")
    return root


def coco_file(root: Path, images: list, annotations: list, categories=None, files=None) -> Path:
    """root/instances.json with the given entries; `files` {file_name: (width, height)} are written under root."""
    for name, (width, height) in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise(height, width).save(root / name)
    coco = {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "thing"}]}
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def square(image_id, ann_id, x0=4, y0=4, x1=20, y1=20) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


# ------------------------------------------------------------------------------------------------- typed errors


def test_data_errors_are_typed_and_print_one_line_under_run_tool(tmp_path, capsys):
    assert issubclass(DataError, ToolError) and issubclass(DataChanged, DataError)
    assert not issubclass(DataError, SystemExit)
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nothing"), DataOptions())
    assert run_tool(lambda: open_source(str(tmp_path / "nothing"), DataOptions())) == 1
    printed = capsys.readouterr().err
    assert printed.startswith(f"error: data {tmp_path / 'nothing'} does not exist (expected DIR/images/")
    assert printed.count("\n") == 1
    assert "SystemExit" not in Path(data.__file__).read_text()


def test_strict_listing_is_a_data_error(tmp_path):
    root = mask_folder(tmp_path / "d", ("a", "b"))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "b_0.png")
    with pytest.raises(DataError, match="1 bad samples") as refused:
        scanned(root, strict=True)
    lines = str(refused.value).splitlines()  # run_tool adds `error: ` to the first line
    assert lines[0] == f"{root} (folder: 2 images): 1 bad samples (1 empty mask)"
    assert lines[1:] == ["  b_0.png: empty mask"]


# ---------------------------------------------------------------------------------------------------------- COCO


def test_coco_duplicate_image_id_never_moves_annotations(tmp_path):
    files = {"a.png": (32, 32), "b.png": (32, 32), "c.png": (32, 32)}
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
              {"id": 1, "file_name": "b.png", "width": 32, "height": 32},
              {"id": 2, "file_name": "c.png", "width": 32, "height": 32}]
    path = coco_file(tmp_path, images, [square(1, 10), square(2, 20)], files=files)
    _, found, log = scanned(path)
    assert [image.name for image in found] == ["c.png"]  # a.png and b.png: no guessing which one ann 10 is on
    reasons = skipped(log)
    assert reasons == {"a.png": "image id 1 is listed 2 times in `images`: its annotations cannot be placed "
                                "(expected unique ids)",
                       "b.png": "image id 1 is listed 2 times in `images`: its annotations cannot be placed "
                                "(expected unique ids)"}


@pytest.mark.parametrize("counts", [[0.5, 1023.5], ["0", "1024"], [True, 1023], [0, 1024.0], 7, None])
def test_coco_rle_counts_that_are_not_non_negative_integers_are_bad_samples(tmp_path, counts):
    # 32x32 = 1024 pixels: each of these sums to 1024 (or is no list), which passed the coverage check before.
    annotations = [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0,
                    "segmentation": {"size": [32, 32], "counts": counts}},
                   {"id": 6, "image_id": 1, "category_id": 1, "iscrowd": 0,
                    "segmentation": {"size": [32, 32], "counts": uncompressed_rle(rect(32, 32, 2, 2, 20, 20))}}]
    path = coco_file(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], annotations,
                     files={"a.png": (32, 32)})
    _, found, log = scanned(path)
    assert [obj.name for obj in found[0].objects] == ["a.png ann 6"]
    assert skipped(log)["a.png ann 5"].startswith("bad RLE: counts")


def test_coco_categories_that_would_merge_or_rename_classes_are_refused(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}]
    same_name = [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]
    path = coco_file(tmp_path, images, [square(1, 10)], categories=same_name, files={"a.png": (32, 32)})
    with pytest.raises(DataError, match="class name 'cat' is given 2 times; per-class scores would merge"):
        open_source(str(path), DataOptions())
    path = coco_file(tmp_path, images, [square(1, 10)], categories=[{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}])
    with pytest.raises(DataError, match=r"categories \['cat', 'dog'\] share the id 1"):
        open_source(str(path), DataOptions())
    # Label maps and datasets class lists too.
    root = label_folder(tmp_path / "maps", {"scene": np.ones((8, 8), np.uint8)}, classes="road\nroad\n")
    with pytest.raises(DataError, match="class name 'road' is given 2 times"):
        open_source(str(root), DataOptions())


def test_coco_iscrowd_is_strictly_0_or_1(tmp_path):
    annotations = [{**square(1, 10), "iscrowd": "0"}, {**square(1, 11), "iscrowd": 2},
                   {**square(1, 12), "iscrowd": True}, {**square(1, 13), "iscrowd": False}, {**square(1, 14)},
                   {**square(1, 15), "iscrowd": 1.0}]
    del annotations[4]["iscrowd"]  # missing: not a crowd
    path = coco_file(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], annotations,
                     files={"a.png": (32, 32)})
    _, found, log = scanned(path)
    assert [obj.name for obj in found[0].objects] == ["a.png ann 13", "a.png ann 14"]
    assert "1 crowd annotations not used" in log  # ann 12 (true)
    assert skipped(log) == {"ann 10": "iscrowd is '0' (expected 0 or 1)", "ann 11": "iscrowd is 2 (expected 0 or 1)",
                            "ann 15": "iscrowd is 1.0 (expected 0 or 1)"}


def test_coco_malformed_entries_are_bad_samples_without_a_traceback(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
              {"id": 2, "file_name": 7, "width": 32, "height": 32},
              {"id": 3, "file_name": "c.png", "width": "32", "height": 32}, "not an image", None,
              {"id": [1], "file_name": "d.png"}]
    annotations = [square(1, 10), "a string", None, {**square(1, 11), "image_id": [1]},
                   {**square(1, 12), "category_id": {"id": 1}}, {**square(1, 13), "segmentation": None}]
    path = coco_file(tmp_path, images, annotations, files={"a.png": (32, 32), "c.png": (32, 32)})
    _, found, log = scanned(path)
    assert [obj.name for obj in found[0].objects] == ["a.png ann 10"]
    assert skipped(log) == {
        "image id 2": "file_name is 7 (expected a path relative to --image-root)",
        "c.png": "width '32' and height 32 are not positive integers",
        "images #3": "image entry without an integer or string `id`",
        "images #4": "image entry without an integer or string `id`",
        "images #5": "image entry without an integer or string `id`",
        "ann #1": "annotation is 'a string' (expected an object)",
        "ann #2": "annotation is None (expected an object)",
        "ann 11": "image id <list> is not in `images`",
        "ann 12": "category id <dict> is not in `categories`",
        "a.png ann 13": "segmentation is neither polygons nor an RLE",
    }


def test_deeply_nested_coco_json_is_one_line_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match="nested too deeply"):
        open_source(str(path), DataOptions())
    path.write_text('{"images": [], "annotations": [], "categories": [{"id": ' + "[" * 500 + "]" * 500 + "}]}")
    with pytest.raises(DataError, match="every category needs an integer `id`"):
        open_source(str(path), DataOptions())


@pytest.mark.parametrize("coordinate", [float("nan"), float("inf"), -float("inf"), 1e30, 10 ** 40, 200])
def test_coco_polygon_with_nan_inf_or_huge_coordinates_is_refused_before_pycocotools(tmp_path, monkeypatch,
                                                                                      coordinate):
    from pycocotools import mask as coco_mask

    decoded = []
    real = coco_mask.frPyObjects

    def watched(segmentation, height, width):
        decoded.append(segmentation)
        if isinstance(segmentation, list):
            assert all(-width <= x <= 2 * width for p in segmentation for x in p), "pycocotools would crash"
        return real(segmentation, height, width)

    monkeypatch.setattr(coco_mask, "frPyObjects", watched)
    bad = {**square(1, 10), "segmentation": [[4, 4, coordinate, 4, 20, 20, 4, 20]]}
    path = coco_file(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], [bad, square(1, 11)],
                     files={"a.png": (32, 32)})
    _, found, log = scanned(path)
    assert [obj.name for obj in found[0].objects] == ["a.png ann 11"]
    assert skipped(log)["a.png ann 10"].startswith("bad polygon (a coordinate is NaN, infinite or far outside")
    assert len(decoded) == 1  # only the good polygon reached pycocotools


def test_coco_file_name_must_stay_inside_the_image_root(tmp_path):
    root = tmp_path / "data"
    noise(32, 32).save(tmp_path / "outside.png")
    (root / "pics").mkdir(parents=True)
    noise(32, 32).save(root / "pics" / "inside.png")
    (root / "pics" / "link.png").symlink_to(tmp_path / "outside.png")  # the user's own link: followed
    names = ["../outside.png", str(tmp_path / "outside.png"), "sub/../../outside.png", "..\\outside.png",
             "inside.png", "link.png"]
    images = [{"id": k, "file_name": name, "width": 32, "height": 32} for k, name in enumerate(names)]
    path = coco_file(root, images, [square(k, 10 + k) for k in range(len(names))])
    _, found, log = scanned(path, DataOptions(image_root=str(root / "pics")))
    assert [image.name for image in found] == ["inside.png", "link.png"]
    outside = "file_name is outside --image-root (absolute or with '..'; expected a path relative to it)"
    assert skipped(log) == {name: outside for name in names[:4]}


def test_coco_declared_size_is_checked_before_masks_are_decoded(tmp_path, monkeypatch):
    from pycocotools import mask as coco_mask

    images = [{"id": 1, "file_name": "huge.png", "width": 40000, "height": 40000},
              {"id": 2, "file_name": "wrong.png", "width": 100, "height": 80},
              {"id": 3, "file_name": "good.png", "width": 64, "height": 64}]
    path = coco_file(tmp_path, images, [square(1, 10), square(2, 20), square(3, 30)],
                     files={"huge.png": (64, 64), "wrong.png": (64, 64), "good.png": (64, 64)})
    sizes = []
    real = coco_mask.frPyObjects
    monkeypatch.setattr(coco_mask, "frPyObjects", lambda s, h, w: sizes.append((w, h)) or real(s, h, w))
    _, found, log = scanned(path)
    assert [image.name for image in found] == ["good.png"]
    assert sizes == [(64, 64)]  # no mask decoded at a declared size that the file does not have
    reasons = skipped(log)
    assert reasons == {
        "huge.png": "image over the pixel limit (declared 40000x40000 = 1,600,000,000 pixels > 50,000,000; "
                    "--max-image-pixels raises it)",
        "wrong.png": "image file is 64x64, the JSON declares 100x80",
    }


def test_image_names_and_their_stems_are_unique_in_every_source(tmp_path):
    files = {"a/img0.png": (16, 16), "a_img0.png": (16, 16), "img0.png": (16, 16), "img0.jpg": (16, 16),
             "b/img1.png": (16, 16)}
    images = [{"id": k, "file_name": name, "width": 16, "height": 16} for k, name in enumerate(files)]
    path = coco_file(tmp_path, images, [square(k, 10 + k, 2, 2, 12, 12) for k in range(len(files))], files=files)
    _, found, log = scanned(path)
    assert [image.name for image in found] == ["a_img0.png", "img0.png", "b_img1.png"]
    assert skipped(log) == {"a_img0.png": "another image is also named a_img0 (a/img0.png)",
                            "img0.jpg": "another image is also named img0 (img0.png)"}
    import datasets

    rows = {"image": [noise(16, 16)] * 3, "mask": [rect(16, 16, 2, 2, 9, 9)] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    for spec in (path, tmp_path / "saved"):
        names = [name for _, name in open_source(str(spec), DataOptions()).items()]
        assert len(set(names)) == len(names) and len({Path(n).stem for n in names}) == len(names)


# ------------------------------------------------------------------------------------------------- files and sizes


def scan_in_thread(spec, options=None, timeout=30.0):
    """scan(open_source(spec)) in a thread; (images, log) or an AssertionError if it is still running after
    `timeout` (then the pipes in the data are opened for writing and closed, so the blocked read ends)."""
    result, printed = {}, []

    def work():
        try:
            result["images"] = scan(open_source(str(spec), options or DataOptions()), PROCESSOR, False, printed.append)
        except BaseException as error:  # noqa: BLE001 - reported below
            result["error"] = error

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for pipe in Path(spec).rglob("*"):
            if pipe.is_fifo():
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        raise AssertionError("the scan hung on a named pipe")
    if "error" in result:
        raise result["error"]
    return result["images"], "\n".join(printed)


def test_named_pipes_are_not_data_and_do_not_hang_the_scan(tmp_path):
    root = mask_folder(tmp_path / "masks-folder", ("a",))
    os.mkfifo(root / "images" / "pipe.png")
    os.mkfifo(root / "masks" / "a_pipe.png")
    (root / "images" / "folder.png").mkdir()
    images, log = scan_in_thread(root)
    assert [(image.name, len(image.objects)) for image in images] == [("a.png", 1)]
    assert skipped(log) == {"pipe.png": "not a regular file", "a_pipe.png": "not a regular file",
                            "folder.png": "not a regular file"}

    maps = label_folder(tmp_path / "maps", {"scene": np.pad(np.ones((8, 8), np.uint8), 8)}, classes="cat\n")
    os.mkfifo(maps / "labels" / "pipe.png")
    images, log = scan_in_thread(maps)
    assert [image.name for image in images] == ["scene.png"]
    assert skipped(log) == {"pipe.png": "not a regular file"}

    coco = coco_file(tmp_path / "coco", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                                         {"id": 2, "file_name": "pipe.png", "width": 32, "height": 32}],
                     [square(1, 10), square(2, 20)], files={"a.png": (32, 32)})
    os.mkfifo(tmp_path / "coco" / "pipe.png")
    images, log = scan_in_thread(coco)
    assert [image.name for image in images] == ["a.png"]
    assert skipped(log) == {"pipe.png": f"image {tmp_path / 'coco' / 'pipe.png'} is not a regular file"}


def test_images_and_masks_over_the_pixel_limit_are_bad_samples_from_the_header(tmp_path):
    root = mask_folder(tmp_path / "d", ("a", "b"))
    png_header(root / "images" / "big.png", 10_000, 10_000)  # 100 megapixels declared, no pixels at all
    Image.fromarray(rect(64, 64, 1, 1, 30, 30).astype(np.uint8) * 255).save(root / "masks" / "big_0.png")
    images, log = scan_in_thread(root)
    assert [image.name for image in images] == ["a.png", "b.png"]
    assert skipped(log) == {"big.png": "image over the pixel limit (10000x10000 = 100,000,000 pixels > 50,000,000; "
                                       "--max-image-pixels raises it)"}
    # The limit is an option (--max-image-pixels); masks are measured too.
    png_header(root / "masks" / "b_1.png", 100, 100)
    images, log = scan_in_thread(root, DataOptions(max_image_pixels=64 * 64))
    assert [(image.name, len(image.objects)) for image in images] == [("a.png", 1), ("b.png", 1)]
    assert skipped(log)["b_1.png"] == ("mask over the pixel limit (100x100 = 10,000 pixels > 4,096; "
                                       "--max-image-pixels raises it)")


def test_objects_per_image_are_bounded_before_masks_are_decoded(tmp_path, monkeypatch):
    ids = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) + 1  # 1,600 instance ids, one per pixel
    root = label_folder(tmp_path / "ids", {"noise": ids, "few": np.kron(np.arange(4, dtype=np.uint16).reshape(2, 2),
                                                                       np.ones((20, 20), np.uint16))}, classes=None)
    made = []
    real = data.LabelMaps.mask
    monkeypatch.setattr(data.LabelMaps, "mask", lambda self, *args: made.append(args[0]) or real(self, *args))
    _, images, log = scanned(root, DataOptions(label_mode="instance"))
    assert [(image.name, len(image.objects)) for image in images] == [("few.png", 3)]
    assert set(made) == {"few"}
    assert skipped(log) == {"noise.png": "too many objects (1600 > 1000 per image; --max-objects-per-image raises "
                                         "it)"}
    # Class mode counts blobs; folders count masks; the bound is an option.
    dots = np.zeros((40, 40), np.uint8)
    for row in range(0, 40, 4):
        for col in range(0, 40, 4):
            dots[row:row + 2, col:col + 2] = 1  # 100 blobs, 2 pixels apart: not 8-connected
    root = label_folder(tmp_path / "blobs", {"dots": dots}, classes="dot\n")
    printed = []
    with pytest.raises(DataError, match="no usable"):
        scan(open_source(str(root), DataOptions(max_objects_per_image=5)), PROCESSOR, False, printed.append)
    assert skipped(printed[0]) == {"dots.png": "too many objects (100 > 5 per image; --max-objects-per-image raises "
                                               "it)"}
    folder = mask_folder(tmp_path / "folder", ("a",))
    for k in range(1, 4):
        Image.fromarray(rect(64, 64, k, k, 40, 40).astype(np.uint8) * 255).save(folder / "masks" / f"a_{k}.png")
    printed = []
    with pytest.raises(DataError, match="no usable"):
        scan(open_source(str(folder), DataOptions(max_objects_per_image=3)), PROCESSOR, False, printed.append)
    assert skipped(printed[0]) == {"a.png": "too many objects (4 > 3 per image; --max-objects-per-image raises it)"}
    assert len(scanned(folder, DataOptions(max_objects_per_image=4))[1][0].objects) == 4


# ------------------------------------------------------------------------------------------ changed after the scan


def test_a_file_deleted_or_changed_after_the_scan_is_named(tmp_path):
    root = mask_folder(tmp_path / "d", ("a", "b", "c"))
    source, images, _ = scanned(root)
    first = {image.name: image for image in images}
    assert source.image(first["a.png"].key).size == (64, 64)  # unchanged files read as before
    (root / "images" / "a.png").unlink()
    with pytest.raises(DataChanged, match=f"image {root / 'images' / 'a.png'} was deleted or replaced after the scan"):
        source.image(first["a.png"].key)
    noise(32, 32).save(root / "images" / "b.png")  # overwritten with another picture
    with pytest.raises(DataChanged, match=f"image {root / 'images' / 'b.png'} was changed after the scan"):
        source.image(first["b.png"].key)
    mask_key = first["c.png"].objects[0].key
    Image.fromarray(rect(64, 64, 0, 0, 5, 5).astype(np.uint8) * 255).save(root / "masks" / "c_0.png")
    with pytest.raises(DataChanged, match="c_0.png was changed after the scan"):
        source.mask(mask_key)

    # Sources without files of their own (a dataset) still name the sample whose size changed.
    coco = coco_file(tmp_path / "coco", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], [square(1, 10)],
                     files={"a.png": (32, 32)})
    source, images, _ = scanned(coco)
    (tmp_path / "coco" / "a.png").unlink()
    with pytest.raises(DataChanged, match="image a.png cannot be read any more since the scan \\(missing image file"):
        source.image(images[0].key)


def test_a_file_changed_under_a_dataloader_worker_gives_the_same_one_line_error(tmp_path):
    import torch

    class Images(torch.utils.data.Dataset):
        def __init__(self, source, images):
            self.source, self.images = source, images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return torch.tensor(self.source.image(self.images[index].key).size)

    root = mask_folder(tmp_path / "d", ("a",))
    source, images, _ = scanned(root)
    noise(32, 32).save(root / "images" / "a.png")
    loader = torch.utils.data.DataLoader(Images(source, images), num_workers=1)
    with pytest.raises(DataChanged) as changed:
        next(iter(loader))
    assert str(changed.value) == (f"image {root / 'images' / 'a.png'} was changed after the scan (its size or "
                                  "modification time differ); the data must not change during a run")
