"""data.py on tiny generated datasets in every format: the right images, objects, classes, boxes and masks; bad files
named and skipped (or refused with --strict-data); clear errors for paths that are no format at all."""

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sam_testing import hub_env, run_python, tiny_sam_config

from sam_split.tools.data import (
    DataError,
    DataOptions,
    add_data_arguments,
    connected_components,
    data_options,
    open_source,
    rle_string_counts,
    scan,
)
from sam_split.tools.processing import model_processor

TESTS = Path(__file__).resolve().parent
# The scans' geometry: 64-px images on a 16x16 mask grid, coarse enough that a 1-pixel object vanishes.
PROCESSOR = model_processor(tiny_sam_config())


def rect(height, width, x0, y0, x1, y1) -> np.ndarray:
    """Bool mask with the inclusive box (x0, y0, x1, y1) set."""
    mask = np.zeros((height, width), bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def noise(height, width, seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


DEFAULT_OPTIONS = DataOptions()


def scanned(spec, options=DEFAULT_OPTIONS, strict=False):
    """(source, images, log text) of open_source + scan."""
    printed = []
    source = open_source(str(spec), options)
    return source, scan(source, PROCESSOR, strict, printed.append), "\n".join(printed)


def objects_of(source, images) -> dict:
    """Object name -> (image name, class name, box, mask)."""
    return {obj.name: (image.name, source.class_names[obj.class_id], obj.box, source.mask(obj.key))
            for image in images for obj in image.objects}


def skipped(log: str) -> dict:
    """Name -> reason of the lines `  name: reason` that scan logs for skipped samples."""
    return dict(re.findall(r"^  (.+?): (.+)$", log, re.MULTILINE))


# ------------------------------------------------------------------------------------------ images/ + masks/ folder


def test_folder_reads_binary_masks_including_upper_case_png_and_16_bit(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    noise(40, 48).save(tmp_path / "images" / "a.png")
    noise(32, 32, seed=1).save(tmp_path / "images" / "b.jpg")
    first, second, third = rect(40, 48, 3, 5, 20, 30), rect(40, 48, 30, 2, 44, 9), rect(32, 32, 8, 8, 23, 15)
    Image.fromarray(first.astype(np.uint8) * 255).save(tmp_path / "masks" / "a_0.png")
    Image.fromarray(second.astype(np.uint8)).save(tmp_path / "masks" / "a_1.PNG")  # 0/1, upper-case suffix
    Image.fromarray(third.astype(np.uint16) * 65535).save(tmp_path / "masks" / "b_tumour.png")  # 16-bit 0/65535
    with Image.open(tmp_path / "masks" / "b_tumour.png") as written:
        assert written.mode.startswith("I")

    source, images, log = scanned(tmp_path)
    assert [(image.name, image.size) for image in images] == [("a.png", (48, 40)), ("b.jpg", (32, 32))]
    assert source.class_names == ["object"]
    found = objects_of(source, images)
    assert {name: value[:3] for name, value in found.items()} == {
        "a_0.png": ("a.png", "object", (3, 5, 20, 30)),
        "a_1.PNG": ("a.png", "object", (30, 2, 44, 9)),
        "b_tumour.png": ("b.jpg", "object", (8, 8, 23, 15)),
    }
    for name, expected in [("a_0.png", first), ("a_1.PNG", second), ("b_tumour.png", third)]:
        assert np.array_equal(found[name][3], expected), name
    assert "skipped" not in log and "2 images, 3 objects (object 3)" in log


def write_bad_folder(root: Path) -> Path:
    """2 good images plus one of each problem the folder format can have."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    good = rect(64, 64, 10, 10, 40, 40).astype(np.uint8) * 255
    for name in ("good1", "good2", "nomasks", "empty", "small", "labels", "truncated", "dot"):
        noise(64, 64).save(root / "images" / f"{name}.png")
    for name in ("good1", "good2"):
        Image.fromarray(good).save(root / "masks" / f"{name}_0.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "empty_0.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "masks" / "small_0.png")
    Image.fromarray((np.arange(64 * 64) % 4).reshape(64, 64).astype(np.uint8)).save(root / "masks" / "labels_0.png")
    (root / "masks" / "truncated_0.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(rect(64, 64, 31, 31, 31, 31).astype(np.uint8) * 255).save(root / "masks" / "dot_0.png")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(good).save(root / "masks" / "broken_0.png")
    Image.fromarray(good).save(root / "masks" / "orphan.png")
    Image.fromarray(good).convert("RGB").save(root / "masks" / "good1_1.jpg")
    noise(64, 64).save(root / "images" / "good2.jpg")  # a second image named good2
    return root


FOLDER_PROBLEMS = {
    "nomasks.png": "image without masks",
    "empty_0.png": "empty mask",
    "small_0.png": "mask is 32x32, image is 64x64",
    "labels_0.png": "mask is not binary",
    "truncated_0.png": "unreadable mask",
    "dot_0.png": "object vanishes at the 16x16 mask grid",
    "broken.png": "unreadable image",
    "orphan.png": "mask without an image",
    "good1_1.jpg": "not a mask file",
    "good2.png": "another image is also named good2",
}


def test_folder_bad_samples_are_named_and_skipped(tmp_path):
    root = write_bad_folder(tmp_path / "bad")
    source, images, log = scanned(root)
    assert [image.name for image in images] == ["good1.png", "good2.jpg"]
    assert [obj.box for image in images for obj in image.objects] == [(10, 10, 40, 40)] * 2
    reasons = skipped(log)
    assert reasons.keys() == FOLDER_PROBLEMS.keys()
    for name, reason in FOLDER_PROBLEMS.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert f"skipped {len(FOLDER_PROBLEMS)} (" in log

    with pytest.raises(DataError, match=f"{len(FOLDER_PROBLEMS)} bad samples") as refused:
        scanned(root, strict=True)
    assert "nomasks.png: image without masks" in str(refused.value)


# --------------------------------------------------------------------------------------------- label-map folder


def flood_fill_components(mask: np.ndarray) -> list:
    """Reference for `connected_components`: the 8-connected pixel sets of `mask`, by breadth-first search."""
    seen, found = set(), []
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        seen.add(start)
        queue, component = [start], set()
        while queue:
            row, col = queue.pop()
            component.add((row, col))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    near = (row + dr, col + dc)
                    if 0 <= near[0] < mask.shape[0] and 0 <= near[1] < mask.shape[1] and mask[near] \
                            and near not in seen:
                        seen.add(near)
                        queue.append(near)
        found.append(component)
    return found


@pytest.mark.parametrize("seed", range(5))
def test_connected_components_match_a_flood_fill(seed):
    mask = np.random.default_rng(seed).random((23, 31)) < 0.35
    labels, count = connected_components(mask)
    expected = flood_fill_components(mask)  # in raster order of first pixels, as the labels are numbered
    assert count == len(expected)
    for number, component in enumerate(expected, 1):
        assert set(zip(*np.nonzero(labels == number))) == component


def label_folder(root: Path, maps: dict, classes: str | None = "background\ncat\ndog\n") -> Path:
    """DIR/images/<name>.png (noise of the map's size) with DIR/labels/<name>.png = the given array or image."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, labels in maps.items():
        image = labels if isinstance(labels, Image.Image) else Image.fromarray(labels)
        noise(image.height, image.width).save(root / "images" / f"{name}.png")
        image.save(root / "labels" / f"{name}.png")
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


def two_cats_and_two_dogs() -> np.ndarray:
    """40x32 map: two separate cat (1) blobs, one of them two squares touching diagonally; a dog (2) region cut in two
    by a void (255) line, and with a void top edge."""
    labels = np.zeros((32, 40), np.uint8)
    labels[2:6, 2:6] = 1
    labels[6:9, 6:10] = 1  # touches the first square at a corner only: the same 8-connected object
    labels[20:30, 3:12] = 1
    labels[10:25, 20:36] = 2
    labels[10, 20:36] = 255
    labels[10:25, 27] = 255  # void separates objects (VOC draws it between touching objects)
    return labels


def test_label_maps_class_mode_one_object_per_blob_with_void(tmp_path):
    labels = two_cats_and_two_dogs()
    root = label_folder(tmp_path / "maps", {"scene": labels})
    source, images, log = scanned(root, DataOptions(ignore_index=255))
    assert source.class_names == ["cat", "dog"]  # classes.txt's `background` line names value 0
    found = objects_of(source, images)
    assert {name: value[:3] for name, value in found.items()} == {
        "scene.png cat #1": ("scene.png", "cat", (2, 2, 9, 8)),
        "scene.png cat #2": ("scene.png", "cat", (3, 20, 11, 29)),
        "scene.png dog #1": ("scene.png", "dog", (20, 11, 26, 24)),
        "scene.png dog #2": ("scene.png", "dog", (28, 11, 35, 24)),
    }
    assert np.array_equal(found["scene.png cat #2"][3], rect(32, 40, 3, 20, 11, 29))
    assert np.array_equal(found["scene.png dog #1"][3], rect(32, 40, 20, 11, 26, 24))  # void pixels in no object
    assert "1 images, 4 objects (cat 2, dog 2)" in log


def test_label_maps_instance_mode_16_bit_and_palette(tmp_path):
    ids = np.zeros((24, 30), np.uint16)
    ids[2:10, 2:10] = 7
    ids[2:10, 10:20] = 300  # touches id 7: separate instances all the same
    ids[15:20, 0:30] = 7  # a second, separate blob of id 7: still the one instance
    assert Image.fromarray(ids).mode.startswith("I")
    palette = Image.fromarray(np.where(rect(24, 30, 5, 5, 9, 12), 3, 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 2 + [0, 200, 0] + [0, 0, 0] * 252)  # index 3 is green
    root = label_folder(tmp_path / "maps", {"ids": ids, "pal": palette}, classes=None)
    source, images, log = scanned(root, DataOptions(label_mode="instance", class_names=("cell",)))
    assert source.class_names == ["cell"]
    found = objects_of(source, images)
    assert {name: value[:3] for name, value in found.items()} == {
        "ids.png id 7": ("ids.png", "cell", (0, 2, 29, 19)),
        "ids.png id 300": ("ids.png", "cell", (10, 2, 19, 9)),
        "pal.png id 3": ("pal.png", "cell", (5, 5, 9, 12)),
    }
    assert np.array_equal(found["ids.png id 7"][3], ids == 7)
    assert np.array_equal(found["pal.png id 3"][3], rect(24, 30, 5, 5, 9, 12))

    # The palette map in class mode: index 3 is the third class, whatever its colour.
    (root / "labels" / "ids.png").unlink()
    (root / "images" / "ids.png").unlink()
    source, images, _ = scanned(root, DataOptions(class_names=("a", "b", "c")))
    assert [(source.class_names[o.class_id], o.box) for o in images[0].objects] == [("c", (5, 5, 9, 12))]


def test_label_map_bad_samples_are_named_and_skipped(tmp_path):
    good = two_cats_and_two_dogs()
    root = label_folder(tmp_path / "maps", {"good": good, "void": good, "rgb": Image.fromarray(good).convert("RGB"),
                                            "small": good[:16, :20]})
    noise(32, 40).save(root / "images" / "nolabels.png")
    Image.fromarray(good).save(root / "labels" / "orphan.png")
    Image.fromarray(good).save(root / "labels" / "good.tif")
    noise(32, 40).save(root / "images" / "truncated.png")
    (root / "labels" / "truncated.png").write_bytes(b"\x89PNG truncated")
    (root / "images" / "small.png").unlink()
    noise(32, 40).save(root / "images" / "small.png")  # image 40x32, label map 20x16
    # Without --ignore-index 255 is not a class, so the maps holding it are refused whole (here: all of them)...
    printed = []
    with pytest.raises(DataError, match="no usable"):
        scan(open_source(str(root), DataOptions()), PROCESSOR, False, printed.append)
    reasons = skipped(printed[0])
    assert reasons["good.png"].startswith("label values [255] are not classes")
    assert reasons["void.png"].startswith("label values [255] are not classes")
    # ... and with it they are kept, while the other problems stay.
    source, images, log = scanned(root, DataOptions(ignore_index=255))
    assert [image.name for image in images] == ["good.png", "void.png"]
    reasons = skipped(log)
    assert reasons.pop("rgb.png").startswith("label map is a RGB image")
    assert reasons.pop("nolabels.png") == "image without a label map"
    assert reasons.pop("orphan.png") == "label map without an image"
    assert reasons.pop("good.tif") == "another label map is also named good"
    assert reasons.pop("truncated.png").startswith("unreadable label map truncated.png")
    assert reasons == {"small.png cat #1": "mask is 20x16, image is 40x32"}  # the one object left in the crop
    with pytest.raises(DataError, match="6 bad samples") as refused:
        scanned(root, DataOptions(ignore_index=255), strict=True)
    assert "nolabels.png: image without a label map" in str(refused.value)


def test_label_maps_need_class_names(tmp_path):
    root = label_folder(tmp_path / "maps", {"scene": two_cats_and_two_dogs()}, classes=None)
    with pytest.raises(DataError, match="need class names.*classes.txt.*--class-names"):
        open_source(str(root), DataOptions())
    with pytest.raises(DataError, match="one class name, not 2"):
        open_source(str(root), DataOptions(label_mode="instance", class_names=("a", "b")))


# --------------------------------------------------------------------------------------------------------- COCO


def uncompressed_rle(mask: np.ndarray) -> list:
    """COCO's uncompressed RLE counts: alternating runs of 0s and 1s, starting with 0s, in column-major order."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.nonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))[0]
    return np.diff(np.concatenate([[0], edges])).tolist()


def write_coco(root: Path) -> Path:
    """instances.json with images under root/pics: every annotation kind, one of each problem."""
    from pycocotools import mask as coco_mask

    (root / "pics" / "sub").mkdir(parents=True)
    for name, (width, height) in {"poly.jpg": (48, 40), "sub/rle.png": (32, 24), "empty.png": (16, 16),
                                  "badpoly.png": (16, 16)}.items():
        noise(height, width).save(root / "pics" / name)
    compressed = coco_mask.encode(np.asfortranarray(rect(24, 32, 1, 2, 6, 9).astype(np.uint8)))
    coco = {
        "images": [
            {"id": 1, "file_name": "poly.jpg", "width": 48, "height": 40},
            {"id": 2, "file_name": "sub/rle.png", "width": 32, "height": 24},
            {"id": 3, "file_name": "empty.png", "width": 16, "height": 16},
            {"id": 4, "file_name": "gone.png", "width": 16, "height": 16},
            {"id": 5, "file_name": "badpoly.png", "width": 16, "height": 16},
            {"id": 6, "file_name": "sizeless.png"},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            # Corners on pixel edges: pixel (x, y) covers [x, x + 1) x [y, y + 1), so columns 2..9, rows 3..7.
            {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
            {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0,
             "segmentation": [[20, 20, 30, 20, 30, 30, 20, 30], [40, 0, 45, 0, 45, 5, 40, 5]]},
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]},
            {"id": 20, "image_id": 2, "category_id": 3, "iscrowd": 0,
             "segmentation": {"size": [24, 32], "counts": uncompressed_rle(rect(24, 32, 10, 4, 20, 19))}},
            {"id": 21, "image_id": 2, "category_id": 7, "iscrowd": 0,
             "segmentation": {"size": [24, 32], "counts": compressed["counts"].decode()}},
            {"id": 22, "image_id": 2, "category_id": 7, "iscrowd": 0,
             "segmentation": {"size": [24, 32], "counts": [5, 3]}},
            {"id": 23, "image_id": 2, "category_id": 7, "iscrowd": 0,
             "segmentation": {"size": [24, 32], "counts": "zzzz"}},
            {"id": 24, "image_id": 2, "category_id": 7, "iscrowd": 0,
             "segmentation": {"size": [32, 24], "counts": compressed["counts"].decode()}},
            {"id": 40, "image_id": 4, "category_id": 7, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]},
            {"id": 50, "image_id": 5, "category_id": 7, "iscrowd": 0, "segmentation": [[1, 1, 5, 5]]},
            {"id": 60, "image_id": 99, "category_id": 7, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]},
            {"id": 70, "image_id": 1, "category_id": 4, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]},
        ],
    }
    (root / "annotations").mkdir()
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_rle_string_counts_read_what_pycocotools_writes():
    from pycocotools import mask as coco_mask

    for seed in range(3):
        mask = np.random.default_rng(seed).random((37, 29)) < 0.3 + 0.2 * seed
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle_string_counts(encoded["counts"]) == uncompressed_rle(mask)


def test_coco_polygons_rle_crowd_and_bad_annotations(tmp_path):
    path = write_coco(tmp_path)
    source, images, log = scanned(path, DataOptions(image_root=str(tmp_path / "pics")))
    assert source.class_names == ["cat", "dog"]  # ordered by category id (3, 7)
    assert [(image.name, image.size) for image in images] == [("poly.jpg", (48, 40)), ("sub_rle.png", (32, 24))]
    found = objects_of(source, images)
    assert {name: value[:3] for name, value in found.items()} == {
        "poly.jpg ann 10": ("poly.jpg", "dog", (2, 3, 9, 7)),
        "poly.jpg ann 11": ("poly.jpg", "cat", (20, 0, 44, 29)),
        "sub/rle.png ann 20": ("sub_rle.png", "cat", (10, 4, 20, 19)),
        "sub/rle.png ann 21": ("sub_rle.png", "dog", (1, 2, 6, 9)),
    }
    assert np.array_equal(found["poly.jpg ann 10"][3], rect(40, 48, 2, 3, 9, 7))
    assert np.array_equal(found["poly.jpg ann 11"][3], rect(40, 48, 20, 20, 29, 29) | rect(40, 48, 40, 0, 44, 4))
    assert np.array_equal(found["sub/rle.png ann 20"][3], rect(24, 32, 10, 4, 20, 19))
    assert np.array_equal(found["sub/rle.png ann 21"][3], rect(24, 32, 1, 2, 6, 9))
    assert "1 crowd annotations not used" in log and "1 images without objects not used" in log
    reasons = skipped(log)
    assert reasons == {
        "ann 60": "image id 99 is not in `images`",
        "ann 70": "category id 4 is not in `categories`",
        "sub/rle.png ann 22": "bad RLE: its counts cover 8 pixels, the image has 768",
        "sub/rle.png ann 23": "bad RLE: its counts cover 50 pixels, the image has 768",
        "sub/rle.png ann 24": "RLE size [32, 24] is not the image's [height, width] [24, 32]",
        "gone.png": f"missing image file {tmp_path / 'pics' / 'gone.png'} (see --image-root)",
        "badpoly.png ann 50": "bad polygon (expected lists of at least 3 x, y pairs)",
        "sizeless.png": "image entry without file_name, width and height",
    }
    assert "2 images, 4 objects (cat 2, dog 2)" in log
    with pytest.raises(DataError, match="8 bad samples"):
        scanned(path, DataOptions(image_root=str(tmp_path / "pics")), strict=True)
    # Without --image-root the images are looked for beside the JSON.
    with pytest.raises(DataError, match="no usable"):
        scanned(path)


# ----------------------------------------------------------------------------------------------------- datasets


def shapes_dataset():
    """3 rows of 32x32 images: 2, 1 and 1 masks with ClassLabel classes; the last row's mask is not binary."""
    import datasets

    masks = [[rect(32, 32, 1, 2, 10, 12) * 255, rect(32, 32, 15, 15, 30, 20)], [rect(32, 32, 4, 4, 8, 8) * 255],
             [np.full((32, 32), 7)]]
    features = datasets.Features({
        "picture": datasets.Image(), "masks": datasets.Sequence(datasets.Image()),
        "kind": datasets.Sequence(datasets.ClassLabel(names=["leaf", "stem"])),
    })
    rows = {"picture": [noise(32, 32, seed) for seed in range(3)],
            "masks": [[Image.fromarray(m.astype(np.uint8)) for m in row] for row in masks],  # 0/255, 0/1, 7
            "kind": [[1, 0], [1], [0]]}
    return datasets.Dataset.from_dict(rows, features=features), masks


DATASET_OPTIONS = DataOptions(image_column="picture", mask_column="masks", class_column="kind")
DATASET_OBJECTS = {"row-0 mask 0": ("row-0", "stem", (1, 2, 10, 12)),
                   "row-0 mask 1": ("row-0", "leaf", (15, 15, 30, 20)),
                   "row-1 mask 0": ("row-1", "stem", (4, 4, 8, 8))}


def check_dataset(source, images, log, masks):
    assert source.class_names == ["leaf", "stem"]
    found = objects_of(source, images)
    assert {name: value[:3] for name, value in found.items()} == DATASET_OBJECTS
    assert np.array_equal(found["row-0 mask 0"][3], masks[0][0] > 0)
    assert np.array_equal(found["row-0 mask 1"][3], masks[0][1] > 0)
    assert skipped(log) == {"row-2 mask 0": "mask is not binary (values [7]...; expected 0/1, 0/255 or 0/65535)"}


def test_saved_dataset_with_class_column(tmp_path):
    import datasets

    dataset, masks = shapes_dataset()
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "saved"))
    check_dataset(*scanned(tmp_path / "saved", DATASET_OPTIONS), masks)
    _, images, _ = scanned(tmp_path / "saved", DataOptions(**{**DATASET_OPTIONS.__dict__, "split": "test"}))
    assert len(images) == 1
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], no 'validation'"):
        open_source(str(tmp_path / "saved"), DataOptions(split="validation"))
    with pytest.raises(DataError, match=r"no column \['mask'\]"):
        open_source(str(tmp_path / "saved"), DataOptions(image_column="picture"))


def test_parquet_folder_loads_like_a_hub_dataset(tmp_path):
    dataset, masks = shapes_dataset()
    (tmp_path / "pq" / "data").mkdir(parents=True)
    dataset.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    check_dataset(*scanned(tmp_path / "pq", DATASET_OPTIONS), masks)


def test_dataset_class_column_of_strings_or_integers(tmp_path):
    import datasets

    masks = [rect(16, 16, 2, 2, 5, 5), rect(16, 16, 8, 8, 12, 12)]
    rows = {"image": [noise(16, 16)] * 3, "mask": [masks, masks[:1], masks],
            "kind": [["stem", "leaf"], ["leaf"], ["leaf"]], "number": [[1, 0], [0], [1]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    source, images, log = scanned(tmp_path / "saved", DataOptions(class_column="kind"))
    assert source.class_names == ["leaf", "stem"]  # the column's distinct strings, sorted
    assert [(obj.name, obj.class_id) for image in images for obj in image.objects] == [
        ("row-0 mask 0", 1), ("row-0 mask 1", 0), ("row-1 mask 0", 0)]
    assert skipped(log) == {"row-2": "2 masks but 1 classes in column 'kind'"}

    source, images, _ = scanned(tmp_path / "saved", DataOptions(class_column="number", class_names=("a", "b")))
    assert [source.class_names[obj.class_id] for image in images for obj in image.objects] == ["b", "a", "a"]
    with pytest.raises(DataError, match="integers without names"):
        open_source(str(tmp_path / "saved"), DataOptions(class_column="number"))


def test_dataset_label_column_and_bad_rows(tmp_path):
    import datasets

    labels = two_cats_and_two_dogs()
    rows = {"image": [noise(32, 40), noise(32, 40), noise(16, 16)],
            "labels": [Image.fromarray(labels), Image.fromarray(np.full((32, 40), 9, np.uint8)),
                       Image.fromarray(labels[:16, :16])]}
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(),
                                                                          "labels": datasets.Image()}))
    dataset.save_to_disk(str(tmp_path / "saved"))
    options = DataOptions(label_column="labels", class_names=("cat", "dog"), ignore_index=255)
    source, images, log = scanned(tmp_path / "saved", options)
    assert {obj.name: obj.box for image in images for obj in image.objects} == {
        "row-0 cat #1": (2, 2, 9, 8), "row-0 cat #2": (3, 20, 11, 29), "row-0 dog #1": (20, 11, 26, 24),
        "row-0 dog #2": (28, 11, 35, 24), "row-2 cat #1": (2, 2, 9, 8)}
    assert skipped(log) == {"row-1": "label values [9] are not classes (classes 1..2, 0 background; --ignore-index "
                                     "for a void value)"}


def push_shapes_twice(repo_id: str, folder: Path) -> list:
    """Push `shapes_dataset()` as parquet to the Hub at HF_ENDPOINT as dataset `repo_id`, then its rows twice over:
    the two commit shas (3 rows, then 6). Run in a child process with `hub_env`."""
    import datasets
    from huggingface_hub import HfApi

    dataset, _ = shapes_dataset()
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    shas, parquet = [], Path(folder) / "train.parquet"
    for rows in (dataset, datasets.concatenate_datasets([dataset, dataset])):
        rows.to_parquet(str(parquet))
        shas.append(api.upload_file(path_or_fileobj=str(parquet), repo_type="dataset", repo_id=repo_id,
                                    path_in_repo="data/train-00000-of-00001.parquet").oid)
    return shas


@pytest.mark.slow
def test_hub_dataset_id_pinned_to_a_revision(tmp_path):
    """A dataset pushed to the local Hub server twice, read by id at the first commit's sha."""
    from hub_server import HubServer

    code = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
from sam_split.tools.data import DataOptions
from test_data import DATASET_OPTIONS, push_shapes_twice, scanned
shas = push_shapes_twice("tester/leaves", {str(tmp_path)!r})
options = DataOptions(**{{**DATASET_OPTIONS.__dict__, "revision": shas[0]}})
source, images, log = scanned("tester/leaves", options)
print(json.dumps({{"shas": shas, "describe": source.describe(), "objects": sum(len(i.objects) for i in images)}}))
"""
    with HubServer(tmp_path / "hub", token="secret") as hub:
        printed = run_python(code, hub_env(hub.url, tmp_path / "hf", token="secret"), replace_env=True)
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["shas"][0] != result["shas"][1]
    assert result["describe"] == "tester/leaves[train] (datasets: 3 rows)"  # the pinned commit, not the 6-row one
    assert result["objects"] == 3


# ----------------------------------------------------------------------------------------- arguments and errors


def test_data_arguments_round_trip(tmp_path):
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    (tmp_path / "names.txt").write_text("_background_\nroad\ncar\n")
    args = parser.parse_args(["--image-root", "pics", "--class-names", str(tmp_path / "names.txt"), "--ignore-index",
                              "255", "--label-mode", "instance", "--image-column", "img", "--mask-column", "m",
                              "--label-column", "lab", "--class-column", "cls", "--train-split", "tr",
                              "--val-split", "va", "--data-revision", "abc123", "--max-image-pixels", "4096",
                              "--max-objects-per-image", "7"])
    assert data_options(args, args.val_split) == DataOptions(
        split="va", image_root="pics", class_names=("road", "car"), ignore_index=255, label_mode="instance",
        image_column="img", mask_column="m", label_column="lab", revision="abc123", class_column="cls",
        max_image_pixels=4096, max_objects_per_image=7)
    assert data_options(parser.parse_args(["--class-names", "a, b,c"]), "train").class_names == ("a", "b", "c")
    defaults = parser.parse_args([])
    assert data_options(defaults, defaults.train_split) == DataOptions()
    assert defaults.val_split == "validation"


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("text-file", "is a file but not a COCO .json"),
    ("empty-folder", "neither a `datasets` folder nor has masks/ or labels/ beside images/"),
    ("images-only", "neither a `datasets` folder nor has masks/"),
    ("both", "has both masks/ and labels/"),
    ("not-coco", "is not a COCO instances file"),
    ("hub-offline", "is not a local path and cannot be loaded as a Hub dataset"),
    ("relative-missing", "does not exist"),
    ("named-pipe", "is not a regular file or folder"),
])
def test_a_path_that_is_no_format_is_a_clear_error(tmp_path, layout, message):
    spec = tmp_path / "data"
    if layout == "text-file":
        spec.write_text("hello")
    elif layout == "named-pipe":
        spec = tmp_path / "data.json"
        os.mkfifo(spec)  # opening it to read would wait for a writer forever
    elif layout == "not-coco":
        spec = tmp_path / "data.json"
        spec.write_text('{"images": []}')
    elif layout not in ("missing", "hub-offline", "relative-missing", "named-pipe"):
        spec.mkdir()
        for folder in {"images-only": ["images"], "both": ["images", "masks", "labels"]}.get(layout, []):
            (spec / folder).mkdir()
    if layout == "hub-offline":
        spec = "someone/dataset-not-here"  # HF_HUB_OFFLINE=1 in conftest: nothing reaches the network
    if layout == "relative-missing":
        spec = "../no-such-folder"  # looks like user/name, but a Hub id does not start with `.`
    with pytest.raises(DataError, match=re.escape(message)) as error:
        open_source(str(spec), DataOptions())
    assert "\n" not in str(error.value) and not str(error.value).startswith("error")
