"""Segmentation data for fine-tuning and evaluation: every common dataset shape read as images with prompt targets.

`open_source(spec, options)` opens one of
  - a folder `DIR/images/<name>.<ext>` + `DIR/masks/<name>*.png`, one binary mask per object (`FolderSource`);
  - a folder `DIR/images/<name>.<ext>` + `DIR/labels/<name>.png`, one label map per image whose integer values are
    classes or instance ids (`LabelMapFolderSource`);
  - a COCO instances `.json`, polygons and RLE (`CocoSource`);
  - a `datasets` dataset: a `save_to_disk` folder, a folder of parquet files or a Hub dataset id (`DatasetSource`).
A source has `class_names`, `describe()`, `items()` ((image key, image name) per image), `objects(image key)`
((mask key, object name, class id) per object; BadSample skips the image, [] leaves it unused), `image(key)` (PIL RGB),
`mask(key)` (bool array) and `skipped_up_front()` ((name, reason) found while listing files).
`scan(source, ...)` then reads every image and mask once, counts, names and skips the bad samples and returns the usable
images with their objects (`ImageRef`, `ObjectRef`), so no bad sample can stop a run half-way.

Images are used as stored: EXIF orientation is not applied, because masks, label maps and COCO annotations are drawn on
the stored pixels.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
BACKGROUND_NAMES = ("background", "_background_")  # a first line naming class 0 in a class-name file
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # not ./x or ../x: those are paths
INSTALL_HINT = "pip install -e '.[train]'"


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason, counted and printed by `scan`."""


@dataclass(frozen=True)
class ObjectRef:
    key: object  # pass to `source.mask(key)`
    name: str  # for messages and overlays
    class_id: int  # index into `source.class_names`
    box: tuple  # tight (x0, y0, x1, y1) of the mask in image pixels


@dataclass(frozen=True)
class ImageRef:
    key: object  # pass to `source.image(key)`
    name: str  # unique per source
    size: tuple  # (width, height)
    objects: tuple  # ObjectRef, at least one


@dataclass(frozen=True)
class DataOptions:
    """Everything the formats need besides the path; the defaults read today's folders and `datasets` columns."""

    split: str = "train"
    image_root: str | None = None
    class_names: tuple | None = None
    ignore_index: int | None = None
    label_mode: str = "class"
    image_column: str = "image"
    mask_column: str = "mask"
    label_column: str | None = None
    revision: str | None = None
    class_column: str | None = None


# --------------------------------------------------------------------------------------------------- pixel helpers


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; 16-bit and float images (common in medical data) are min-max scaled to 8 bits first."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0) * 255.0
        image = Image.fromarray(array.round().astype(np.uint8))
    return image.convert("RGB")


def binary_mask(mask) -> np.ndarray:
    """A mask (PIL image or array) with values in {0, 1}, {0, 255} or (16-bit) {0, 65535} as a bool (height, width)."""
    if isinstance(mask, Image.Image):
        mask = mask.convert("L") if mask.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "P") else mask
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        array = array[..., 0]
    if array.ndim != 2:
        raise BadSample(f"mask has shape {array.shape}, expected (height, width)")
    if array.dtype == bool:
        return array
    values = set(np.unique(array).tolist())
    if not any(values <= {0, high} for high in (1, 255, 65535)):
        raise BadSample(f"mask is not binary (values {sorted(values)[:6]}...; expected 0/1, 0/255 or 0/65535)")
    return array > 0


def label_array(labels) -> np.ndarray:
    """A label map (PIL image or array) as integers (height, width); palette PNGs give their indices, not colours."""
    if isinstance(labels, Image.Image):
        if labels.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise BadSample(f"label map is a {labels.mode} image; expected one class or instance id per pixel "
                            "(an 8- or 16-bit grey or a palette PNG)")
        labels = np.asarray(labels)
    array = np.asarray(labels)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise BadSample(f"label map has shape {array.shape} and type {array.dtype}; expected integers (height, width)")
    return array.astype(np.int64)


def connected_components(mask: np.ndarray) -> tuple:
    """8-connected components of a bool mask: (labels, count), labels 1..count numbered in raster order of each
    component's first pixel, 0 outside. Works on runs of pixels, so its Python loop is over runs, not pixels."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)  # runs [start, end) per row, in raster order
    ends = np.nonzero(step == -1)[1]
    parent = list(range(len(rows)))

    def root(run):
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    row_first = np.searchsorted(rows, np.arange(height + 1)).tolist()
    starts_list, ends_list = starts.tolist(), ends.tolist()
    for row in range(1, height):
        above, above_end = row_first[row - 1], row_first[row]
        below, below_end = row_first[row], row_first[row + 1]
        while above < above_end and below < below_end:
            # Diagonal neighbours touch too: [s1, e1) and [s2, e2) are 8-connected when s1 <= e2 and s2 <= e1.
            if starts_list[above] <= ends_list[below] and starts_list[below] <= ends_list[above]:
                parent[root(above)] = root(below)
            if ends_list[above] < ends_list[below]:
                above += 1
            else:
                below += 1
    labels = np.zeros((height, width), np.int32)
    if not parent:
        return labels, 0
    roots = np.array([root(run) for run in range(len(parent))])
    _, first_run, inverse = np.unique(roots, return_index=True, return_inverse=True)
    number = np.empty(len(first_run), np.int32)
    number[np.argsort(first_run)] = np.arange(1, len(first_run) + 1)
    lengths = ends - starts
    offsets = np.repeat(rows * width + starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    labels.flat[offsets] = np.repeat(number[inverse.ravel()], lengths)
    return labels, len(first_run)


def rle_string_counts(text) -> list:
    """The run lengths of a COCO compressed RLE string (as pycocotools' `rleFrString` reads them): 5 bits per
    character with a continuation bit, and from the fourth run on a difference to the run two before."""
    text = text.decode() if isinstance(text, bytes) else str(text)
    counts, position = [], 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise BadSample("bad RLE: the string ends inside a count")
            char = ord(text[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position, shift = position + 1, shift + 1
            if not more and char & 0x10:  # sign bit of the last chunk
                value |= -1 << (5 * shift)
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts


def read_class_names(path: Path) -> tuple:
    """Class names for ids 1..N, one per line; a first line `background` / `_background_` names id 0 and is dropped."""
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read class names from {path} ({error})")
    names = [line.strip() for line in lines]
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    if not names or not all(names):
        raise SystemExit(f"error: {path} must hold one class name per line for label values 1, 2, ... "
                         "(no empty lines)")
    return tuple(names)


# --------------------------------------------------------------------------------------------------------- formats


def _image_files(folder: Path) -> tuple:
    """{stem: path} of the images in `folder`, and (name, reason) for stems held by two files."""
    images, clashes = {}, []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            clashes.append((path.name, f"another image is also named {path.stem} ({images[path.stem].name})"))
        else:
            images[path.stem] = path
    return images, clashes


def _annotation_files(folder: Path, what: str, bad: list) -> list:
    """The mask or label-map files in `folder`; other files are added to `bad` (a JPEG mask is not binary any more)."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix.lower() in MASK_SUFFIXES:
            files.append(path)
        else:
            bad.append((path.name, f"not a {what} file (expected {', '.join(MASK_SUFFIXES)})"))
    return files


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


class FolderSource:
    """`DIR/images/<name>.<ext>` with one binary mask per object, `DIR/masks/<name>*.png` (a mask belongs to the
    longest image name that prefixes it, so `case1` and `case10` do not steal each other's masks)."""

    def __init__(self, root: Path):
        self.root, self.class_names = root, ["object"]
        self.images, self.bad = _image_files(root / "images")
        self.masks = {stem: [] for stem in self.images}
        for path in _annotation_files(root / "masks", "mask", self.bad):
            owner = next((path.stem[:k] for k in range(len(path.stem), 0, -1) if path.stem[:k] in self.images), None)
            if owner is None:
                self.bad.append((path.name, "mask without an image"))
            else:
                self.masks[owner].append(path)

    def describe(self) -> str:
        return f"{self.root} (folder: {len(self.images)} images)"

    def items(self):
        """(image key, image name) per image."""
        return [(stem, path.name) for stem, path in self.images.items()]

    def skipped_up_front(self) -> list:
        return self.bad

    def objects(self, stem) -> list:
        """(mask key, object name, class id) per object; BadSample skips the image, [] marks it as unused."""
        if not self.masks[stem]:
            raise BadSample("image without masks")
        return [(str(path), path.name, 0) for path in self.masks[stem]]

    def image(self, stem) -> Image.Image:
        return _open_image(self.images[stem])

    def mask(self, key) -> np.ndarray:
        with Image.open(key) as mask:
            mask.load()
            return binary_mask(mask)


class LabelMaps:
    """Objects of label maps, shared by the label-map folder and a `datasets` label column.

    Class mode: each 8-connected component of each class value is one object of that class (value v is
    `class_names[v - 1]`). Instance mode: each id is one object, of the single class. 0 is background; `ignore_index`
    pixels are neither, so they are outside every object's mask."""

    def __init__(self, class_names, mode: str, ignore_index, where: str):
        if mode not in ("class", "instance"):
            raise SystemExit(f"error: label mode {mode!r} is not 'class' or 'instance'")
        if mode == "class" and not class_names:
            raise SystemExit(f"error: {where} holds label maps, which need class names for values 1, 2, ...: "
                             "a classes.txt beside images/ or --class-names a,b,c (or --class-names FILE), or "
                             "--label-mode instance for instance ids")
        if mode == "instance" and class_names and len(class_names) != 1:
            raise SystemExit("error: --label-mode instance gives every id the same class: pass one class name, "
                             f"not {len(class_names)}")
        self.class_names = list(class_names or ["object"])
        self.mode, self.ignore_index = mode, ignore_index
        self._last_map = (None, None)  # (image key, label map) of the last map read
        self._last_components = (None, None)  # ((image key, value), components) of the last class asked for

    def objects(self, labels: np.ndarray, image_name: str) -> list:
        """(value, component, class id, object name) per object of `labels`."""
        values = [v for v in np.unique(labels).tolist() if v != 0 and v != self.ignore_index]
        if self.mode == "instance":
            return [(value, 0, 0, f"{image_name} id {value}") for value in values]
        unknown = [v for v in values if v > len(self.class_names) or v < 0]
        if unknown:
            raise BadSample(f"label values {unknown[:6]} are not classes (classes 1..{len(self.class_names)}, "
                            "0 background; --ignore-index for a void value)")
        found = []
        for value in values:
            count = connected_components(labels == value)[1]
            name = self.class_names[value - 1]
            found += [(value, k, value - 1, f"{image_name} {name} #{k + 1}") for k in range(count)]
        return found

    def mask(self, key, read_labels, value: int, component: int) -> np.ndarray:
        if self.mode == "instance":
            return self._read(key, read_labels) == value
        cached_key, components = self._last_components
        if cached_key != (key, value):
            components = connected_components(self._read(key, read_labels) == value)[0]
            self._last_components = ((key, value), components)
        return components == component + 1

    def _read(self, key, read_labels) -> np.ndarray:
        # Scan and training ask for the objects of one image in a row: the last map is kept.
        if self._last_map[0] != key:
            self._last_map = (key, read_labels(key))
        return self._last_map[1]


class LabelMapFolderSource:
    """`DIR/images/<name>.<ext>` with one label map `DIR/labels/<name>.png` per image (8/16-bit grey or palette),
    class names from --class-names or `DIR/classes.txt`."""

    def __init__(self, root: Path, options: DataOptions):
        self.root = root
        class_names = options.class_names
        if class_names is None and (root / "classes.txt").is_file():
            class_names = read_class_names(root / "classes.txt")
        self.maps = LabelMaps(class_names, options.label_mode, options.ignore_index, str(root))
        self.class_names = self.maps.class_names
        self.images, self.bad = _image_files(root / "images")
        self.labels = {}
        for path in _annotation_files(root / "labels", "label map", self.bad):
            if path.stem not in self.images:
                self.bad.append((path.name, "label map without an image"))
            elif path.stem in self.labels:
                self.bad.append((path.name, f"another label map is also named {path.stem}"))
            else:
                self.labels[path.stem] = path

    def describe(self) -> str:
        return f"{self.root} (label maps, {self.maps.mode} mode: {len(self.images)} images)"

    def items(self):
        return [(stem, path.name) for stem, path in self.images.items()]

    def skipped_up_front(self) -> list:
        return self.bad

    def _labels(self, stem) -> np.ndarray:
        if stem not in self.labels:
            raise BadSample("image without a label map")
        try:
            with Image.open(self.labels[stem]) as labels:
                labels.load()
                return label_array(labels)
        except (OSError, ValueError) as error:
            raise BadSample(f"unreadable label map {self.labels[stem].name} ({type(error).__name__}: {error})")

    def objects(self, stem) -> list:
        labels = self._labels(stem)
        return [((stem, value, k), name, class_id)
                for value, k, class_id, name in self.maps.objects(labels, self.images[stem].name)]

    def image(self, stem) -> Image.Image:
        return _open_image(self.images[stem])

    def mask(self, key) -> np.ndarray:
        stem, value, component = key
        return self.maps.mask(stem, self._labels, value, component)


class CocoSource:
    """A COCO instances `.json` (polygons, RLE): one object per annotation, images under --image-root (default: the
    JSON's folder). Crowd annotations (`iscrowd: 1`) mark a group of objects, not one, and are not used."""

    def __init__(self, path: Path, options: DataOptions):
        try:
            coco = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise SystemExit(f"error: cannot read {path} as JSON ({error})")
        if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
            raise SystemExit(f"error: {path} is not a COCO instances file (expected lists `images`, `annotations` "
                             "and `categories`)")
        self.path, self.image_root = path, Path(options.image_root) if options.image_root else path.parent
        try:
            categories = sorted(coco["categories"], key=lambda c: c["id"])
            self.class_names = [str(c["name"]) for c in categories]
            listed = {image["id"]: image for image in coco["images"]}
        except (KeyError, TypeError) as error:
            raise SystemExit(f"error: {path}: every category needs an `id` and a `name`, every image an `id` "
                             f"({type(error).__name__}: {error})")
        class_of = {c["id"]: index for index, c in enumerate(categories)}
        self.bad, self.crowd = [], 0
        self.images = {}
        for image_id, image in listed.items():
            if all(k in image for k in ("file_name", "width", "height")):
                self.images[image_id] = image
            else:
                self.bad.append((f"image id {image_id}", "image entry without file_name, width and height"))
        # Keyed by position: annotation ids are not always unique in hand-made files.
        self.annotations, self.by_image = {}, {image_id: [] for image_id in self.images}
        for index, annotation in enumerate(coco["annotations"]):
            name = f"ann {annotation.get('id', f'#{index}')}"
            if annotation.get("iscrowd"):
                self.crowd += 1
            elif annotation.get("image_id") not in self.images:
                self.bad.append((name, f"image id {annotation.get('image_id')} is not in `images`"))
            elif annotation.get("category_id") not in class_of:
                self.bad.append((name, f"category id {annotation.get('category_id')} is not in `categories`"))
            else:
                self.annotations[index] = annotation
                self.by_image[annotation["image_id"]].append((index, name, class_of[annotation["category_id"]]))

    def describe(self) -> str:
        crowd = f", {self.crowd} crowd annotations not used" if self.crowd else ""
        return f"{self.path} (COCO: {len(self.images)} images, {len(self.annotations)} annotations{crowd})"

    def items(self):
        # `/` would make subfolders of the overlay names.
        return [(image_id, image["file_name"].replace("/", "_")) for image_id, image in self.images.items()]

    def skipped_up_front(self) -> list:
        return self.bad

    def objects(self, image_id) -> list:
        # An image without annotations is a negative, not an error: it is counted as unused.
        file_name = self.images[image_id]["file_name"]
        return [(index, f"{file_name} {name}", class_id) for index, name, class_id in self.by_image[image_id]]

    def image(self, image_id) -> Image.Image:
        path = self.image_root / self.images[image_id]["file_name"]
        if not path.is_file():
            raise BadSample(f"missing image file {path} (see --image-root)")
        return _open_image(path)

    def mask(self, index) -> np.ndarray:
        try:
            from pycocotools import mask as coco_mask
        except ImportError:
            raise SystemExit(f"error: COCO masks need pycocotools: {INSTALL_HINT}")
        annotation = self.annotations[index]
        image = self.images[annotation["image_id"]]
        height, width = image["height"], image["width"]
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):
            # pycocotools reads a polygon of fewer than 3 points out of bounds instead of refusing it.
            if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                           and all(isinstance(x, (int, float)) for x in p) for p in segmentation):
                raise BadSample("bad polygon (expected lists of at least 3 x, y pairs)")
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            if list(segmentation["size"]) != [height, width]:
                raise BadSample(f"RLE size {segmentation['size']} is not the image's [height, width] "
                                f"{[height, width]}")
            counts = segmentation["counts"]
            # pycocotools decodes run lengths that do not cover the image exactly into garbage, without a word.
            lengths = counts if isinstance(counts, list) else rle_string_counts(counts)
            if sum(lengths) != height * width or min(lengths, default=0) < 0:
                raise BadSample(f"bad RLE: its counts cover {sum(lengths)} pixels, the image has {height * width}")
            rle = coco_mask.frPyObjects(segmentation, height, width) if isinstance(counts, list) else \
                {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise BadSample("segmentation is neither polygons nor an RLE")
        return coco_mask.decode(rle).astype(bool)


class DatasetSource:
    """A `datasets.Dataset`: an image column and either a mask column (one binary mask or a list per row, with an
    optional class column beside it) or a label-map column."""

    def __init__(self, dataset, where: str, options: DataOptions):
        import datasets

        if isinstance(dataset, datasets.DatasetDict):
            split = options.split if options.split in dataset else next(iter(dataset))
            if split != options.split and len(dataset) != 1:
                raise SystemExit(f"error: {where} has splits {sorted(dataset)}, no {options.split!r} "
                                 "(see --train-split/--val-split)")
            where, dataset = f"{where}[{split}]", dataset[split]
        if options.label_column and options.class_column:
            raise SystemExit("error: --class-column names the classes of --mask-column's masks; a --label-column "
                             "holds its classes itself")
        self.where, self.image_column, self.class_column = where, options.image_column, options.class_column
        self.target_column = options.label_column or options.mask_column
        wanted = [self.image_column, self.target_column] + ([self.class_column] if self.class_column else [])
        missing = [c for c in wanted if c not in dataset.column_names]
        if missing:
            raise SystemExit(f"error: {where} has no column {missing} (columns: {dataset.column_names}; see "
                             "--image-column/--mask-column/--label-column/--class-column)")
        # One-column views, so that reading a mask does not decode the image of its row and vice versa.
        self.image_rows = dataset.select_columns([self.image_column])
        self.target_rows = dataset.select_columns([self.target_column])
        self.maps = None
        if options.label_column:
            self.maps = LabelMaps(options.class_names, options.label_mode, options.ignore_index, where)
            self.class_names = self.maps.class_names
        elif self.class_column:
            self.class_rows = dataset.select_columns([self.class_column])
            self.class_names = self._class_names(options.class_names)
        else:
            self.class_names = ["object"]

    def _class_names(self, given) -> list:
        """Names for the class column: a `ClassLabel`'s, else --class-names (integers index them from 0, as in
        `ClassLabel`), else the sorted distinct strings of the column."""
        feature = self.class_rows.features[self.class_column]
        feature = getattr(feature, "feature", feature)  # a list of classes per row
        if hasattr(feature, "names"):
            return list(feature.names)
        if given:
            return list(given)
        values = {v for row in self.class_rows[self.class_column] for v in (row if isinstance(row, list) else [row])}
        if not all(isinstance(v, str) for v in values):
            raise SystemExit(f"error: class column {self.class_column!r} of {self.where} holds integers without "
                             "names: use a ClassLabel feature or pass --class-names (integers index them from 0)")
        return sorted(values)

    def describe(self) -> str:
        return f"{self.where} (datasets: {len(self.target_rows)} rows)"

    def items(self):
        return [(row, f"row-{row}") for row in range(len(self.target_rows))]

    def skipped_up_front(self) -> list:
        return []

    def _target(self, row):
        return self.target_rows[row][self.target_column]

    def _masks(self, row) -> list:
        masks = self._target(row)
        return list(masks) if isinstance(masks, (list, tuple)) else [masks]

    def _classes(self, row, count: int) -> list:
        if not self.class_column:
            return [0] * count
        classes = self.class_rows[row][self.class_column]
        classes = list(classes) if isinstance(classes, (list, tuple)) else [classes]
        if len(classes) != count:
            raise BadSample(f"{count} masks but {len(classes)} classes in column {self.class_column!r}")
        ids = [self.class_names.index(c) if isinstance(c, str) and c in self.class_names else c for c in classes]
        if not all(isinstance(i, int) and 0 <= i < len(self.class_names) for i in ids):
            raise BadSample(f"classes {classes} are not all in {self.class_names}")
        return ids

    def _labels(self, row) -> np.ndarray:
        return label_array(self._target(row))

    def objects(self, row) -> list:
        if self.maps is not None:
            return [((row, value, k), name, class_id)
                    for value, k, class_id, name in self.maps.objects(self._labels(row), f"row-{row}")]
        count = len(self._masks(row))
        if not count:
            raise BadSample("row without masks")
        return [((row, i), f"row-{row} mask {i}", class_id) for i, class_id in enumerate(self._classes(row, count))]

    def image(self, row) -> Image.Image:
        image = self.image_rows[row][self.image_column]
        return to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))

    def mask(self, key) -> np.ndarray:
        if self.maps is not None:
            row, value, component = key
            return self.maps.mask(row, self._labels, value, component)
        row, index = key
        return binary_mask(self._masks(row)[index])


def _dataset_source(spec: str, kind: str, options: DataOptions) -> "DatasetSource":
    """`kind`: "saved" (`save_to_disk`), "files" (a local folder `load_dataset` reads) or "hub" (a dataset id)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"error: {spec} needs the `datasets` package: {INSTALL_HINT}")
    try:
        if kind == "saved":
            loaded = datasets.load_from_disk(spec)
        else:
            loaded = datasets.load_dataset(spec, revision=options.revision if kind == "hub" else None)
    except Exception as error:  # the Hub, the network and the files raise many kinds; the message is what counts
        where = f"{spec} is not a local path and cannot be loaded as a Hub dataset" if kind == "hub" else \
            f"cannot load the dataset {spec}"
        raise SystemExit(f"error: {where} ({type(error).__name__}: {error})")
    return DatasetSource(loaded, spec, options)


def open_source(spec: str, options: DataOptions):
    """The source for `spec`: a folder with images/ + masks/ or labels/, a COCO .json, a `datasets` folder (saved
    with `save_to_disk`, or parquet files) or a Hub dataset id `user/name`."""
    path = Path(spec)
    expected = ("expected DIR/images/ with DIR/masks/ (binary masks) or DIR/labels/ (label maps), a COCO instances "
                ".json, a `datasets` folder (save_to_disk or parquet files) or a Hub dataset id user/name")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return CocoSource(path, options)
        raise SystemExit(f"error: {spec} is a file but not a COCO .json ({expected})")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return _dataset_source(spec, "saved", options)
        has = {name: (path / name).is_dir() for name in ("images", "masks", "labels")}
        if has["images"] and has["masks"] and has["labels"]:
            raise SystemExit(f"error: {spec} has both masks/ and labels/: keep the one to train on")
        if has["images"] and has["masks"]:
            return FolderSource(path)
        if has["images"] and has["labels"]:
            return LabelMapFolderSource(path, options)
        if next(path.rglob("*.parquet"), None) is not None:  # last: it walks the whole folder
            return _dataset_source(spec, "files", options)
        raise SystemExit(f"error: {spec} is neither a `datasets` folder nor has masks/ or labels/ beside images/ "
                         f"({expected})")
    if HUB_ID.fullmatch(spec):
        return _dataset_source(spec, "hub", options)
    raise SystemExit(f"error: data {spec} does not exist ({expected})")


# ------------------------------------------------------------------------------------------------------------ scan


def low_res_target(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask at SAM's low-res mask grid: longest side resized to `size` as the processor resizes the image to
    `image_size`, then zero-padded bottom/right like the image, so it lines up with `pred_masks`."""
    height, width = mask.shape
    scale = size / max(height, width)
    new_size = (int(width * scale + 0.5), int(height * scale + 0.5))
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new_size, Image.NEAREST)) > 127
    target = np.zeros((size, size), dtype=np.float32)
    target[: resized.shape[0], : resized.shape[1]] = resized
    return target


def _reason(error: Exception, what: str) -> str:
    return str(error) if isinstance(error, BadSample) else f"unreadable {what} ({type(error).__name__}: {error})"


def scan(source, mask_grid: int, strict: bool, log) -> list:
    """Read every image and mask once; return the usable images (`ImageRef`) and log the skipped samples by reason.

    Bad samples (unreadable files, size mismatches, empty or non-binary masks, objects vanishing at the
    `mask_grid` x `mask_grid` mask grid, bad annotations) are counted, named and skipped, or with `strict` make a
    SystemExit listing them. Images without objects that their format allows (COCO, label maps) are counted as
    unused."""
    images, skipped, unused = [], list(source.skipped_up_front()), 0
    for image_key, image_name in source.items():
        try:
            candidates = source.objects(image_key)
        except Exception as error:
            skipped.append((image_name, _reason(error, "annotation")))
            continue
        if not candidates:
            unused += 1
            continue
        try:
            width, height = source.image(image_key).size
        except Exception as error:
            skipped.append((image_name, _reason(error, "image")))
            continue
        objects = []
        for mask_key, object_name, class_id in candidates:
            try:
                mask = source.mask(mask_key)
            except Exception as error:
                skipped.append((object_name, _reason(error, "mask")))
                continue
            if mask.shape != (height, width):
                skipped.append((object_name, f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}"))
            elif not mask.any():
                skipped.append((object_name, "empty mask"))
            elif not low_res_target(mask, mask_grid).any():
                skipped.append((object_name, f"object vanishes at the {mask_grid}x{mask_grid} mask grid"))
            else:
                rows, cols = np.nonzero(mask)
                box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
                objects.append(ObjectRef(mask_key, object_name, class_id, box))
        if objects:
            images.append(ImageRef(image_key, image_name, (width, height), tuple(objects)))
    if skipped:
        reasons = Counter(re.sub(r" \(.*", "", reason) for _, reason in skipped)
        lines = [f"  {name}: {reason}" for name, reason in skipped[:10]]
        more = [f"  ... and {len(skipped) - 10} more"] if len(skipped) > 10 else []
        summary = "; ".join(f"{count} {reason}" for reason, count in reasons.items())
        if strict:
            raise SystemExit("\n".join([f"error: {source.describe()}: {len(skipped)} bad samples ({summary})"]
                                       + lines + more))
        log("\n".join([f"{source.describe()}: skipped {len(skipped)} ({summary})"] + lines + more))
    if not images:
        raise SystemExit(f"error: {source.describe()} has no usable (image, mask) pair")
    per_class = Counter(obj.class_id for image in images for obj in image.objects)
    classes = ", ".join(f"{name} {per_class[i]}" for i, name in enumerate(source.class_names))
    without = f"; {unused} images without objects not used" if unused else ""
    log(f"{source.describe()}: {len(images)} images, {sum(per_class.values())} objects ({classes}){without}")
    return images


# ------------------------------------------------------------------------------------------------------- arguments


def add_data_arguments(parser) -> None:
    """The data-format flags (`data_options` reads them), in their own group of `parser`'s help."""
    group = parser.add_argument_group(
        "data formats",
        "A data path is one of: a folder DIR/images/<name>.png|jpg|... with DIR/masks/<name>*.png (one binary 0/1, "
        "0/255 or 0/65535 mask per object); a folder DIR/images/ with DIR/labels/<name>.png (one label map per "
        "image: 8/16-bit grey or palette PNG, 0 = background, class names in DIR/classes.txt or --class-names); a "
        "COCO instances .json (polygons or RLE; crowd annotations are not used); a `datasets` folder (save_to_disk "
        "or parquet files); or a Hub dataset id user/name (pin it with --data-revision). Every image and mask is "
        "read once before use: bad samples are counted, named and skipped.",
    )
    group.add_argument("--image-root", metavar="DIR",
                       help="COCO: folder the images' file_name are relative to (default: the JSON's folder)")
    group.add_argument("--class-names", metavar="A,B,C|FILE",
                       help="label maps: names of label values 1, 2, ... as a comma-separated list or a file with one "
                            "name per line (a first line `background` names 0 and is skipped); default: "
                            "DIR/classes.txt. A datasets --class-column of integers: names of 0, 1, ...")
    group.add_argument("--ignore-index", type=int, metavar="VALUE",
                       help="label maps: a void value (e.g. 255) that is neither object nor background: its pixels "
                            "are outside every object's mask")
    group.add_argument("--label-mode", choices=("class", "instance"), default="class",
                       help="label maps: `class` = each connected blob of each class value is one object; "
                            "`instance` = each id is one object (one class; name it with --class-names NAME)")
    group.add_argument("--image-column", default="image", metavar="COLUMN", help="datasets: the image column")
    group.add_argument("--mask-column", default="mask", metavar="COLUMN", help="datasets: one binary mask or a list of masks per row")
    group.add_argument("--class-column", metavar="COLUMN",
                       help="datasets: the class of each mask of --mask-column (one or a list per row; a ClassLabel, "
                            "strings, or integers naming --class-names from 0)")
    group.add_argument("--label-column", metavar="COLUMN",
                       help="datasets: a label-map column instead of --mask-column (--label-mode, --class-names and "
                            "--ignore-index apply)")
    group.add_argument("--train-split", default="train", metavar="SPLIT", help="datasets: split of --train-data")
    group.add_argument("--val-split", default="validation", metavar="SPLIT",
                       help="datasets: split of --val-data (a dataset with a single split uses that one)")
    group.add_argument("--data-revision", metavar="SHA",
                       help="Hub datasets: revision (branch, tag or commit sha; pin a sha for reproducible runs)")


def data_options(args, split: str) -> DataOptions:
    """The options for one data argument read from `add_data_arguments`' flags; `split` is its split name."""
    class_names = None
    if args.class_names:
        path = Path(args.class_names)
        class_names = read_class_names(path) if path.is_file() else \
            tuple(name.strip() for name in args.class_names.split(",") if name.strip())
    return DataOptions(
        split=split, image_root=args.image_root, class_names=class_names, ignore_index=args.ignore_index,
        label_mode=args.label_mode, image_column=args.image_column, mask_column=args.mask_column,
        label_column=args.label_column, revision=args.data_revision, class_column=args.class_column,
    )
