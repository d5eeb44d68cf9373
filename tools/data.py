"""Segmentation data for fine-tuning and evaluation: every common dataset shape read as images with prompt targets.

`open_source(spec, options)` opens one of
  - a folder `DIR/images/<name>.<ext>` + `DIR/masks/<name>*.png`, one binary mask per object (`FolderSource`);
  - a folder `DIR/images/<name>.<ext>` + `DIR/labels/<name>.png`, one label map per image whose integer values are
    classes or instance ids (`LabelMapFolderSource`);
  - a COCO instances `.json`, polygons and RLE (`CocoSource`);
  - a `datasets` dataset: a `save_to_disk` folder, a folder of parquet files or a Hub dataset id (`DatasetSource`).
A source has `class_names`, `describe()`, `items()` ((image key, image name) per image; names and their stems are
unique per source, since evaluate.py writes its outputs per image name), `objects(image key)` ((mask key, object
name, class id) per object; BadSample skips the image, [] leaves it unused), `image(key)` (PIL RGB), `mask(key)`
(bool array) and `skipped_up_front()` ((name, reason) found while listing files).
`scan(source, ...)` then reads every image and mask once, counts, names and skips the bad samples and returns the usable
images with their objects (`ImageRef`, `ObjectRef`), so no bad sample can stop a run half-way.

Errors: data that cannot be used at all (a path that is no format, a bad option or class list, no usable sample)
raises `DataError`, a `ToolError` (the CLIs print its one line and exit 1); a bad sample raises `BadSample` inside a
source and is counted and skipped by `scan`; a file that is gone, changed or unreadable when it is read again after
the scan (training, evaluation) raises `DataChanged` naming it.

Files: only regular files are data (a named pipe, or a folder named like an image, is a bad sample and never opened).
A COCO `file_name` must stay inside --image-root: absolute paths and `..` are refused; a symlink inside the root is
followed wherever it points, because the user made it. Sizes are checked before they cost memory: images, masks and
label maps over `max_image_pixels` are bad samples found from the file header, a COCO image whose file is not the size
it declares is a bad sample before any of its masks is decoded, and an image with more than `max_objects_per_image`
objects is a bad sample before its masks are decoded.

Images are used as stored: EXIF orientation is not applied, because masks, label maps and COCO annotations are drawn on
the stored pixels.
"""

import argparse
import json
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .cli import ToolError, local_path
from .processing import low_res_target, mask_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
BACKGROUND_NAMES = ("background", "_background_")  # a first line naming class 0 in a class-name file
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # not ./x or ../x: those are paths
INSTALL_HINT = "pip install -e '.[train]'"
# 50 megapixels: above common camera sensors (24-45 MP), far above what SAM looks at (1024x1024), and an RGB copy
# (150 MB) plus one bool mask per object (50 MB each) still fits a small machine. PIL itself warns from 89.5 MP and
# refuses images over 179 MP, whatever --max-image-pixels says.
MAX_IMAGE_PIXELS = 50_000_000
# Every object of an image is decoded at full resolution for one forward in evaluation: COCO's most crowded images
# have under 100 objects; 1,000 keeps a label map of 65,535 ids (noise, or a wrong --label-mode) from becoming 65,535
# masks.
MAX_OBJECTS_PER_IMAGE = 1000


class DataError(ToolError):
    """Data that cannot be used at all: a path that is no format, a bad option or class list, no usable sample. The
    message is one line saying what was expected (scan's --strict-data listing adds the bad samples below it)."""


class DataChanged(DataError):
    """A sample that passed the scan is gone, changed or unreadable when it is read again (a file deleted or overwritten
    during a run); the message names it."""

    def __init__(self, message: str):
        # torch's DataLoader re-raises a worker's exception as `DataChanged("Caught DataChanged in DataLoader worker
        # process N.\nOriginal Traceback ...")`: keep the original's one line, which the traceback ends with.
        if message.startswith(f"Caught {type(self).__name__} ") and "\n" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[-1]
        super().__init__(message)


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
    name: str  # unique per source, and so is its stem
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
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_objects_per_image: int = MAX_OBJECTS_PER_IMAGE


# --------------------------------------------------------------------------------------------------- pixel helpers


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; 16-bit and float images (common in medical data) are min-max scaled to 8 bits first. A
    float image with NaN or infinite pixels is a `BadSample`: no value for them would be right (NaN became 0)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise BadSample(f"{bad} of its {array.size} pixels are NaN or infinite (a float image): no 8-bit value "
                            "for them would be right")
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
        raise DataError(f"cannot read class names from {path} ({error})") from None
    names = [line.strip() for line in lines]
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    if not names or not all(names):
        raise DataError(f"{path} must hold one class name per line for label values 1, 2, ... (no empty lines)")
    return tuple(names)


def distinct_class_names(names, where: str) -> list:
    """`names` as a list if no name is given twice; per-class scores are keyed by name, so two classes of one name
    would be merged without a word: a DataError instead."""
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise DataError(f"{where}: class name {twice[0]!r} is given {Counter(names)[twice[0]]} times; per-class scores "
                        "would merge those classes (expected distinct class names)")
    return list(names)


def _shown(value) -> str:
    """A short text of a value read from a data file, for messages (a deeply nested list would overflow `repr`)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"<{type(value).__name__}>"


def _within_limit(image: Image.Image, max_pixels: int, what: str) -> Image.Image:
    """`image` (opened lazily: only its header is read) if it has at most `max_pixels` pixels, else a BadSample."""
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(f"{what} over the pixel limit ({width}x{height} = {width * height:,} pixels > {max_pixels:,}; "
                        "--max-image-pixels raises it)")
    return image


def _too_many_objects(count: int, limit: int) -> BadSample:
    return BadSample(f"too many objects ({count} > {limit} per image; --max-objects-per-image raises it)")


def _reason(error: Exception, what: str) -> str:
    return str(error) if isinstance(error, BadSample) else f"unreadable {what} ({type(error).__name__}: {error})"


# ------------------------------------------------------------------------------------------------------------ files


class _Files:
    """The reads of a source's files. Only regular files are read. During the scan each file's size and modification
    time are noted; once `sealed` (the end of the scan), a file that is gone, changed or unreadable raises DataChanged
    naming it, so that a run stops with the file's name instead of a traceback or other data."""

    def __init__(self):
        self.seen, self.sealed = {}, False

    def read(self, path: Path, what: str, reader):
        """`reader(image)` of the file `path` opened lazily by PIL (its header is read, its pixels are not)."""
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            problem = f"missing {what} file {path}" if info is None else f"{what} {path} is not a regular file"
            if self.sealed:
                raise DataChanged(f"{what} {path} was deleted or replaced after the scan; the data must not change "
                                  "during a run")
            raise BadSample(problem)
        fingerprint = (info.st_size, info.st_mtime_ns)
        if self.sealed and self.seen.get(str(path), fingerprint) != fingerprint:
            raise DataChanged(f"{what} {path} was changed after the scan (its size or modification time differ); "
                              "the data must not change during a run")
        try:
            with Image.open(path) as image:
                result = reader(image)
        except Exception as error:
            if not self.sealed:
                raise
            raise DataChanged(f"{what} {path} cannot be read any more ({_reason(error, what)})") from error
        if not self.sealed:
            self.seen[str(path)] = fingerprint
        return result


class _Source:
    """What every format shares: the limits of the options, the file reads, and `image`/`mask` that after `seal`
    (the end of the scan) raise DataChanged for a sample that fails or has another size than the scan saw. A format
    implements `_image(key)` and `_mask(key)`."""

    def __init__(self, options: "DataOptions"):
        self.max_pixels, self.max_objects = options.max_image_pixels, options.max_objects_per_image
        self.files, self.scanned = _Files(), None
        self.bad = []  # (name, reason) of what was found bad while listing the files

    def skipped_up_front(self) -> list:
        return self.bad

    def seal(self, images: list) -> None:
        """Called by `scan` with the usable images it found."""
        self.files.sealed = True
        self.scanned = {("image", ref.key): (ref.name, ref.size) for ref in images}
        self.scanned.update({("mask", obj.key): (obj.name, ref.size) for ref in images for obj in ref.objects})

    def image(self, key) -> Image.Image:
        return self._read_again("image", key, self._image)

    def mask(self, key) -> np.ndarray:
        return self._read_again("mask", key, self._mask)

    def _read_again(self, kind: str, key, read):
        if self.scanned is None or (kind, key) not in self.scanned:
            return read(key)
        name, size = self.scanned[(kind, key)]
        try:
            result = read(key)
        except DataChanged:
            raise
        except Exception as error:
            raise DataChanged(f"{kind} {name} cannot be read any more since the scan ({_reason(error, kind)})") \
                from error
        found = result.size if kind == "image" else result.shape[::-1]
        if tuple(found) != tuple(size):
            raise DataChanged(f"{kind} {name} is {found[0]}x{found[1]} now, {size[0]}x{size[1]} when it was scanned; "
                              "the data must not change during a run")
        return result

    def _image_file(self, path: Path) -> Image.Image:
        return self.files.read(path, "image", lambda image: to_rgb(_within_limit(image, self.max_pixels, "image")))


# --------------------------------------------------------------------------------------------------------- formats


def _image_files(folder: Path) -> tuple:
    """{stem: path} of the images in `folder`, and (name, reason) for stems held by two files and for image names
    that are not regular files (a named pipe would block the reader forever)."""
    images, bad = {}, []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not path.is_file():
            bad.append((path.name, "not a regular file"))
        elif path.stem in images:
            bad.append((path.name, f"another image is also named {path.stem} ({images[path.stem].name})"))
        else:
            images[path.stem] = path
    return images, bad


def _annotation_files(folder: Path, what: str, bad: list) -> list:
    """The mask or label-map files in `folder`; other files are added to `bad` (a JPEG mask is not binary any more)."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file():
            bad.append((path.name, "not a regular file"))
        elif path.suffix.lower() in MASK_SUFFIXES:
            files.append(path)
        else:
            bad.append((path.name, f"not a {what} file (expected {', '.join(MASK_SUFFIXES)})"))
    return files


class FolderSource(_Source):
    """`DIR/images/<name>.<ext>` with one binary mask per object, `DIR/masks/<name>*.png` (a mask belongs to the
    longest image name that prefixes it, so `case1` and `case10` do not steal each other's masks)."""

    def __init__(self, root: Path, options: "DataOptions" = None):
        super().__init__(options or DataOptions())
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

    def objects(self, stem) -> list:
        """(mask key, object name, class id) per object; BadSample skips the image, [] marks it as unused."""
        if not self.masks[stem]:
            raise BadSample("image without masks")
        return [(str(path), path.name, 0) for path in self.masks[stem]]

    def _image(self, stem) -> Image.Image:
        return self._image_file(self.images[stem])

    def _mask(self, key) -> np.ndarray:
        return self.files.read(Path(key), "mask",
                               lambda mask: binary_mask(_within_limit(mask, self.max_pixels, "mask")))


class LabelMaps:
    """Objects of label maps, shared by the label-map folder and a `datasets` label column.

    Class mode: each 8-connected component of each class value is one object of that class (value v is
    `class_names[v - 1]`). Instance mode: each id is one object, of the single class. 0 is background; `ignore_index`
    pixels are neither, so they are outside every object's mask. A map with more than `max_objects` objects is a bad
    sample found before any object's mask is made."""

    def __init__(self, class_names, mode: str, ignore_index, where: str, max_objects: int = MAX_OBJECTS_PER_IMAGE):
        if mode not in ("class", "instance"):
            raise DataError(f"label mode {mode!r} is not 'class' or 'instance'")
        if mode == "class" and not class_names:
            raise DataError(f"{where} holds label maps, which need class names for values 1, 2, ...: a classes.txt "
                            "beside images/ or --class-names a,b,c (or --class-names FILE), or --label-mode instance "
                            "for instance ids")
        if mode == "instance" and class_names and len(class_names) != 1:
            raise DataError("--label-mode instance gives every id the same class: pass one class name, "
                            f"not {len(class_names)}")
        self.class_names = distinct_class_names(class_names or ["object"], where)
        self.mode, self.ignore_index, self.max_objects = mode, ignore_index, max_objects
        self._last_map = (None, None)  # (image key, label map) of the last map read
        self._last_components = (None, None)  # ((image key, value), components) of the last class asked for

    def objects(self, labels: np.ndarray, image_name: str) -> list:
        """(value, component, class id, object name) per object of `labels`."""
        values = [v for v in np.unique(labels).tolist() if v != 0 and v != self.ignore_index]
        if self.mode == "instance":
            if len(values) > self.max_objects:
                raise _too_many_objects(len(values), self.max_objects)
            return [(value, 0, 0, f"{image_name} id {value}") for value in values]
        unknown = [v for v in values if v > len(self.class_names) or v < 0]
        if unknown:
            raise BadSample(f"label values {unknown[:6]} are not classes (classes 1..{len(self.class_names)}, "
                            "0 background; --ignore-index for a void value)")
        found = []
        for value in values:
            count = connected_components(labels == value)[1]
            if len(found) + count > self.max_objects:
                raise _too_many_objects(len(found) + count, self.max_objects)
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


class LabelMapFolderSource(_Source):
    """`DIR/images/<name>.<ext>` with one label map `DIR/labels/<name>.png` per image (8/16-bit grey or palette),
    class names from --class-names or `DIR/classes.txt`."""

    def __init__(self, root: Path, options: "DataOptions"):
        super().__init__(options)
        self.root = root
        class_names = options.class_names
        if class_names is None and (root / "classes.txt").is_file():
            class_names = read_class_names(root / "classes.txt")
        self.maps = LabelMaps(class_names, options.label_mode, options.ignore_index, str(root), self.max_objects)
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

    def _labels(self, stem) -> np.ndarray:
        if stem not in self.labels:
            raise BadSample("image without a label map")
        path = self.labels[stem]
        try:
            return self.files.read(path, "label map",
                                   lambda labels: label_array(_within_limit(labels, self.max_pixels, "label map")))
        except (OSError, ValueError) as error:
            raise BadSample(f"unreadable label map {path.name} ({type(error).__name__}: {error})") from None

    def objects(self, stem) -> list:
        labels = self._labels(stem)
        return [((stem, value, k), name, class_id)
                for value, k, class_id, name in self.maps.objects(labels, self.images[stem].name)]

    def _image(self, stem) -> Image.Image:
        return self._image_file(self.images[stem])

    def _mask(self, key) -> np.ndarray:
        stem, value, component = key
        return self.maps.mask(stem, self._labels, value, component)


def _is_id(value) -> bool:
    """An id a COCO file can use to point at an image or a category: an integer (not a bool) or a string."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _escapes(file_name: str) -> bool:
    """Whether `file_name` leaves the folder it is relative to: absolute (POSIX or Windows) or with a `..` part.
    Checked on the text, so a symlink the user made inside the root may point anywhere."""
    parts = re.split(r"[/\\]", file_name)
    return file_name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", file_name)) or ".." in parts


def _coco_classes(categories: list, where: str) -> tuple:
    """(class names ordered by category id, {category id: class index}); a DataError for categories that would
    merge or lose classes without a word (two ids of one name, two names of one id)."""
    if not all(isinstance(c, dict) and type(c.get("id")) is int and isinstance(c.get("name"), str) and c["name"]
               for c in categories):
        raise DataError(f"{where}: every category needs an integer `id` and a non-empty string `name`")
    ids = Counter(c["id"] for c in categories)
    shared = next((category_id for category_id, count in ids.items() if count > 1), None)
    if shared is not None:
        names = [c["name"] for c in categories if c["id"] == shared]
        raise DataError(f"{where}: categories {names} share the id {shared} (expected one category per id)")
    categories = sorted(categories, key=lambda c: c["id"])
    names = distinct_class_names([c["name"] for c in categories], f"{where} (categories)")
    return names, {c["id"]: index for index, c in enumerate(categories)}


def _coco_image_problem(entry, listed: Counter, max_pixels: int) -> str | None:
    """Why the `images` entry cannot be used, or None."""
    if not all(k in entry for k in ("file_name", "width", "height")):
        return "image entry without file_name, width and height"
    if listed[entry["id"]] > 1:
        return f"image id {entry['id']} is listed {listed[entry['id']]} times in `images`: its annotations cannot be " \
               "placed (expected unique ids)"
    file_name, width, height = entry["file_name"], entry["width"], entry["height"]
    if not isinstance(file_name, str) or not file_name.strip():
        return f"file_name is {_shown(file_name)} (expected a path relative to --image-root)"
    if _escapes(file_name):
        return "file_name is outside --image-root (absolute or with '..'; expected a path relative to it)"
    if not (_is_size(width) and _is_size(height)):
        return f"width {_shown(width)} and height {_shown(height)} are not positive integers"
    if width * height > max_pixels:
        return f"image over the pixel limit (declared {width}x{height} = {width * height:,} pixels > {max_pixels:,}; " \
               "--max-image-pixels raises it)"
    return None


def _coco_images(entries: list, max_pixels: int, bad: list) -> tuple:
    """({image id: entry}, {image id: name}) of the usable `images` entries, names unique down to their stems; the
    others are added to `bad`. Also the set of ids whose entries were refused, whose annotations go with them."""
    listed = Counter(e["id"] for e in entries if isinstance(e, dict) and _is_id(e.get("id")))
    images, names, stems, refused = {}, {}, {}, set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_id(entry.get("id")):
            bad.append((f"images #{index}", "image entry without an integer or string `id`"))
            continue
        problem = _coco_image_problem(entry, listed, max_pixels)
        # `/` would make subfolders of the overlay names; evaluate.py writes its outputs per name stem.
        name = entry["file_name"].replace("/", "_").replace("\\", "_") if problem is None else None
        if name is not None and Path(name).stem in stems:
            problem = f"another image is also named {Path(name).stem} ({stems[Path(name).stem]})"
        if problem is not None:
            file_name = entry.get("file_name")
            usable = isinstance(file_name, str) and file_name.strip()
            bad.append((file_name if usable else f"image id {entry['id']}", problem))
            refused.add(entry["id"])
            continue
        images[entry["id"]], names[entry["id"]], stems[Path(name).stem] = entry, name, entry["file_name"]
    return images, names, refused


def _coco_annotations(entries: list, images: dict, refused: set, class_of: dict, bad: list) -> tuple:
    """({position: annotation}, {image id: [(position, name, class index)]}, crowd count). Keyed by position:
    annotation ids are not always unique in hand-made files. Annotations of refused images go with them, unnamed."""
    annotations, by_image, crowd = {}, {image_id: [] for image_id in images}, 0
    for index, annotation in enumerate(entries):
        if not isinstance(annotation, dict):
            bad.append((f"ann #{index}", f"annotation is {_shown(annotation)} (expected an object)"))
            continue
        label = annotation.get("id")
        name = f"ann {label if _is_id(label) else f'#{index}'}"
        is_crowd, image_id, category_id = (annotation.get(k) for k in ("iscrowd", "image_id", "category_id"))
        if is_crowd is not None and (type(is_crowd) not in (int, bool) or is_crowd not in (0, 1)):
            # "0" is true in Python: anything but 0/1 (or false/true) would be read as crowd or not by accident.
            bad.append((name, f"iscrowd is {_shown(is_crowd)} (expected 0 or 1)"))
        elif is_crowd:
            crowd += 1
        elif _is_id(image_id) and image_id in refused:
            continue
        elif not _is_id(image_id) or image_id not in images:
            bad.append((name, f"image id {_shown(image_id)} is not in `images`"))
        elif not _is_id(category_id) or category_id not in class_of:
            bad.append((name, f"category id {_shown(category_id)} is not in `categories`"))
        else:
            annotations[index] = annotation
            by_image[image_id].append((index, name, class_of[category_id]))
    return annotations, by_image, crowd


def _polygon_problem(segmentation: list, height: int, width: int) -> str | None:
    """Why a polygon list cannot be decoded, or None. Checked before pycocotools, which reads a polygon of fewer than
    3 points out of bounds and crashes (SIGSEGV) or takes tens of GB on a NaN, infinite or huge coordinate."""
    if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                   and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
                                   for p in segmentation):
        return "bad polygon (expected lists of at least 3 x, y pairs)"
    # NaN fails every comparison, so one bounds check refuses NaN, infinities and huge values alike.
    if not all(-width <= x <= 2 * width for p in segmentation for x in p[0::2]) or \
            not all(-height <= y <= 2 * height for p in segmentation for y in p[1::2]):
        return f"bad polygon (a coordinate is NaN, infinite or far outside the {width}x{height} image; expected x in " \
               f"[-{width}, {2 * width}], y in [-{height}, {2 * height}])"
    return None


def _rle_problem(segmentation: dict, height: int, width: int) -> str | None:
    """Why an RLE cannot be decoded, or None: pycocotools decodes run lengths that do not cover the image exactly,
    or that are not non-negative integers, into garbage (uninitialised memory) without a word."""
    size, counts = segmentation["size"], segmentation["counts"]
    if size != [height, width]:
        shown = size if isinstance(size, list) and len(size) == 2 and all(map(_is_size, size)) else _shown(size)
        return f"RLE size {shown} is not the image's [height, width] {[height, width]}"
    if isinstance(counts, list):
        if not all(type(count) is int and count >= 0 for count in counts):
            return "bad RLE: counts must be non-negative integers"
        lengths = counts
    elif isinstance(counts, str):
        lengths = rle_string_counts(counts)
    else:
        return f"bad RLE: counts is {_shown(counts)} (expected a list of integers or a compressed string)"
    if sum(lengths) != height * width or min(lengths, default=0) < 0:
        return f"bad RLE: its counts cover {sum(lengths)} pixels, the image has {height * width}"
    return None


def _pycocotools_mask():
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise DataError(f"COCO masks need pycocotools: {INSTALL_HINT}") from None
    return coco_mask


class CocoSource(_Source):
    """A COCO instances `.json` (polygons, RLE): one object per annotation, images under --image-root (default: the
    JSON's folder). Crowd annotations (`iscrowd: 1`, or true) mark a group of objects, not one, and are not used; any
    other `iscrowd` than 0/1/false/true (such as the string "0") makes the annotation a bad sample."""

    def __init__(self, path: Path, options: "DataOptions"):
        super().__init__(options)
        try:
            coco = json.loads(path.read_text())
        except RecursionError:
            raise DataError(f"cannot read {path} as JSON: it is nested too deeply (expected a COCO instances "
                            "file)") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise DataError(f"cannot read {path} as JSON ({error})") from None
        if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
            raise DataError(f"{path} is not a COCO instances file (expected lists `images`, `annotations` and "
                            "`categories`)")
        self.path, self.image_root = path, Path(options.image_root) if options.image_root else path.parent
        self.class_names, class_of = _coco_classes(coco["categories"], str(path))
        self.images, self.names, refused = _coco_images(coco["images"], self.max_pixels, self.bad)
        self.annotations, self.by_image, self.crowd = _coco_annotations(coco["annotations"], self.images, refused,
                                                                        class_of, self.bad)

    def describe(self) -> str:
        crowd = f", {self.crowd} crowd annotations not used" if self.crowd else ""
        return f"{self.path} (COCO: {len(self.images)} images, {len(self.annotations)} annotations{crowd})"

    def items(self):
        return list(self.names.items())

    def objects(self, image_id) -> list:
        # An image without annotations is a negative, not an error: it is counted as unused.
        file_name = self.images[image_id]["file_name"]
        if len(self.by_image[image_id]) > self.max_objects:
            raise _too_many_objects(len(self.by_image[image_id]), self.max_objects)
        return [(index, f"{file_name} {name}", class_id) for index, name, class_id in self.by_image[image_id]]

    def _image(self, image_id) -> Image.Image:
        entry = self.images[image_id]
        path, declared = self.image_root / entry["file_name"], (entry["width"], entry["height"])
        if not path.exists():
            raise BadSample(f"missing image file {path} (see --image-root)")

        def checked(image):
            # Before the pixels and before any mask: the masks are decoded at the declared size.
            if image.size != declared:
                raise BadSample(f"image file is {image.size[0]}x{image.size[1]}, the JSON declares "
                                f"{declared[0]}x{declared[1]}")
            return to_rgb(image)

        return self.files.read(path, "image", checked)

    def _mask(self, index) -> np.ndarray:
        coco_mask = _pycocotools_mask()
        annotation = self.annotations[index]
        image = self.images[annotation["image_id"]]
        height, width = image["height"], image["width"]
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):
            problem = _polygon_problem(segmentation, height, width)
            if problem is None:
                rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            problem = _rle_problem(segmentation, height, width)
            counts = segmentation["counts"]
            if problem is None:
                rle = coco_mask.frPyObjects(segmentation, height, width) if isinstance(counts, list) else \
                    {"size": [height, width], "counts": counts.encode()}
        else:
            problem = "segmentation is neither polygons nor an RLE"
        if problem is not None:
            raise BadSample(problem)
        return coco_mask.decode(rle).astype(bool)


class DatasetSource(_Source):
    """A `datasets.Dataset`: an image column and either a mask column (one binary mask or a list per row, with an
    optional class column beside it) or a label-map column. Rows are named `row-N`. The datasets library decodes an
    image before it can be measured, so the pixel limit is checked just after."""

    def __init__(self, dataset, where: str, options: "DataOptions"):
        import datasets

        super().__init__(options)
        if isinstance(dataset, datasets.DatasetDict):
            split = options.split if options.split in dataset else next(iter(dataset))
            if split != options.split and len(dataset) != 1:
                raise DataError(f"{where} has splits {sorted(dataset)}, no {options.split!r} "
                                "(see --train-split/--val-split)")
            where, dataset = f"{where}[{split}]", dataset[split]
        if options.label_column and options.class_column:
            raise DataError("--class-column names the classes of --mask-column's masks; a --label-column holds its "
                            "classes itself")
        self.where, self.image_column, self.class_column = where, options.image_column, options.class_column
        self.target_column = options.label_column or options.mask_column
        wanted = [self.image_column, self.target_column] + ([self.class_column] if self.class_column else [])
        missing = [c for c in wanted if c not in dataset.column_names]
        if missing:
            raise DataError(f"{where} has no column {missing} (columns: {dataset.column_names}; see "
                            "--image-column/--mask-column/--label-column/--class-column)")
        # One-column views, so that reading a mask does not decode the image of its row and vice versa.
        self.image_rows = dataset.select_columns([self.image_column])
        self.target_rows = dataset.select_columns([self.target_column])
        self.maps = None
        if options.label_column:
            self.maps = LabelMaps(options.class_names, options.label_mode, options.ignore_index, where,
                                  self.max_objects)
            self.class_names = self.maps.class_names
        elif self.class_column:
            self.class_rows = dataset.select_columns([self.class_column])
            self.class_names = distinct_class_names(self._class_names(options.class_names), where)
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
            raise DataError(f"class column {self.class_column!r} of {self.where} holds integers without names: use a "
                            "ClassLabel feature or pass --class-names (integers index them from 0)")
        return sorted(values)

    def describe(self) -> str:
        return f"{self.where} (datasets: {len(self.target_rows)} rows)"

    def items(self):
        return [(row, f"row-{row}") for row in range(len(self.target_rows))]

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
        labels = label_array(self._target(row))
        if labels.size > self.max_pixels:
            raise BadSample(f"label map over the pixel limit ({labels.shape[1]}x{labels.shape[0]} = {labels.size:,} "
                            f"pixels > {self.max_pixels:,}; --max-image-pixels raises it)")
        return labels

    def objects(self, row) -> list:
        if self.maps is not None:
            return [((row, value, k), name, class_id)
                    for value, k, class_id, name in self.maps.objects(self._labels(row), f"row-{row}")]
        count = len(self._masks(row))
        if not count:
            raise BadSample("row without masks")
        if count > self.max_objects:
            raise _too_many_objects(count, self.max_objects)
        return [((row, i), f"row-{row} mask {i}", class_id) for i, class_id in enumerate(self._classes(row, count))]

    def _image(self, row) -> Image.Image:
        image = self.image_rows[row][self.image_column]
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        return to_rgb(_within_limit(image, self.max_pixels, "image"))

    def _mask(self, key) -> np.ndarray:
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
        raise DataError(f"{spec} needs the `datasets` package: {INSTALL_HINT}") from None
    try:
        if kind == "saved":
            loaded = datasets.load_from_disk(spec)
        else:
            loaded = datasets.load_dataset(spec, revision=options.revision if kind == "hub" else None)
    except Exception as error:  # the Hub, the network and the files raise many kinds; the message is what counts
        where = f"{spec} is not a local path and cannot be loaded as a Hub dataset" if kind == "hub" else \
            f"cannot load the dataset {spec}"
        reason = " ".join(str(error).split())  # one line
        raise DataError(f"{where} ({type(error).__name__}: {reason})") from None
    return DatasetSource(loaded, spec, options)


def open_source(spec: str, options: DataOptions):
    """The source for `spec`: a folder with images/ + masks/ or labels/, a COCO .json, a `datasets` folder (saved
    with `save_to_disk`, or parquet files) or a Hub dataset id `user/name`. Raises DataError for anything else."""
    path = local_path(spec, flag="data")
    expected = ("expected DIR/images/ with DIR/masks/ (binary masks) or DIR/labels/ (label maps), a COCO instances "
                ".json, a `datasets` folder (save_to_disk or parquet files) or a Hub dataset id user/name")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return CocoSource(path, options)
        raise DataError(f"{spec} is a file but not a COCO .json ({expected})")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return _dataset_source(spec, "saved", options)
        has = {name: (path / name).is_dir() for name in ("images", "masks", "labels")}
        if has["images"] and has["masks"] and has["labels"]:
            raise DataError(f"{spec} has both masks/ and labels/: keep the one to train on")
        if has["images"] and has["masks"]:
            return FolderSource(path, options)
        if has["images"] and has["labels"]:
            return LabelMapFolderSource(path, options)
        if next(path.rglob("*.parquet"), None) is not None:  # last: it walks the whole folder
            return _dataset_source(spec, "files", options)
        raise DataError(f"{spec} is neither a `datasets` folder nor has masks/ or labels/ beside images/ ({expected})")
    if path.exists():
        raise DataError(f"data {spec} is not a regular file or folder ({expected})")
    if HUB_ID.fullmatch(spec):
        return _dataset_source(spec, "hub", options)
    raise DataError(f"data {spec} does not exist ({expected})")


# ------------------------------------------------------------------------------------------------------------ scan


def _scan_objects(source, candidates: list, size: tuple, processor, skipped: list) -> list:
    """The usable `ObjectRef`s among `candidates` of an image of `size` (width, height); the others go to
    `skipped`. Masks are read one at a time."""
    width, height = size
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
        elif not low_res_target(mask, processor).any():
            grid = mask_grid(processor)
            skipped.append((object_name, f"object vanishes at the {grid}x{grid} mask grid"))
        else:
            rows, cols = np.nonzero(mask)
            box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
            objects.append(ObjectRef(mask_key, object_name, class_id, box))
    return objects


def scan(source, processor, strict: bool, log) -> list:
    """Read every image and mask once; return the usable images (`ImageRef`) and log the skipped samples by reason.

    Bad samples (unreadable files, size mismatches, images over the pixel limit or with too many objects, empty or
    non-binary masks, objects vanishing at the `processor`'s low-res mask grid (`processing.low_res_target`), bad
    annotations) are counted, named and skipped, or with `strict` make a DataError listing them. Images without
    objects that their format allows (COCO, label maps) are counted as unused. At the end the source is sealed: a
    sample read again later that is gone or changed raises DataChanged."""
    images, skipped, unused = [], list(source.skipped_up_front()), 0
    for image_key, image_name in source.items():
        try:
            candidates = source.objects(image_key)
            if len(candidates) > source.max_objects:
                raise _too_many_objects(len(candidates), source.max_objects)
        except Exception as error:
            skipped.append((image_name, _reason(error, "annotation")))
            continue
        if not candidates:
            unused += 1
            continue
        try:
            size = source.image(image_key).size
        except Exception as error:
            skipped.append((image_name, _reason(error, "image")))
            continue
        objects = _scan_objects(source, candidates, size, processor, skipped)
        if objects:
            images.append(ImageRef(image_key, image_name, size, tuple(objects)))
    if skipped:
        reasons = Counter(re.sub(r" \(.*", "", reason) for _, reason in skipped)
        lines = [f"  {name}: {reason}" for name, reason in skipped[:10]]
        more = [f"  ... and {len(skipped) - 10} more"] if len(skipped) > 10 else []
        summary = "; ".join(f"{count} {reason}" for reason, count in reasons.items())
        if strict:
            raise DataError("\n".join([f"{source.describe()}: {len(skipped)} bad samples ({summary})"] + lines + more))
        log("\n".join([f"{source.describe()}: skipped {len(skipped)} ({summary})"] + lines + more))
    if not images:
        raise DataError(f"{source.describe()} has no usable (image, mask) pair")
    source.seal(images)
    per_class = Counter(obj.class_id for image in images for obj in image.objects)
    classes = ", ".join(f"{name} {per_class[i]}" for i, name in enumerate(source.class_names))
    without = f"; {unused} images without objects not used" if unused else ""
    log(f"{source.describe()}: {len(images)} images, {sum(per_class.values())} objects ({classes}){without}")
    return images


# ------------------------------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def add_data_arguments(parser) -> None:
    """The data-format flags (`data_options` reads them), in their own group of `parser`'s help."""
    group = parser.add_argument_group(
        "data formats",
        "A data path is one of: a folder DIR/images/<name>.png|jpg|... with DIR/masks/<name>*.png (one binary 0/1, "
        "0/255 or 0/65535 mask per object); a folder DIR/images/ with DIR/labels/<name>.png (one label map per "
        "image: 8/16-bit grey or palette PNG, 0 = background, class names in DIR/classes.txt or --class-names); a "
        "COCO instances .json (polygons or RLE; crowd annotations are not used; file_name inside --image-root); a "
        "`datasets` folder (save_to_disk or parquet files); or a Hub dataset id user/name (pin it with "
        "--data-revision). Every image and mask is read once before use: bad samples are counted, named and "
        "skipped.",
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
    group.add_argument("--mask-column", default="mask", metavar="COLUMN",
                       help="datasets: one binary mask or a list of masks per row")
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
    group.add_argument("--max-image-pixels", type=_positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                       help=f"images (and masks, label maps) with more pixels are bad samples, found from the file "
                            f"header before they are decoded (default {MAX_IMAGE_PIXELS:,}; PIL itself refuses "
                            "images over 178,956,970 pixels)")
    group.add_argument("--max-objects-per-image", type=_positive_int, default=MAX_OBJECTS_PER_IMAGE, metavar="N",
                       help="an image with more objects (masks, annotations, label-map blobs or ids) is a bad sample, "
                            f"found before its masks are decoded (default {MAX_OBJECTS_PER_IMAGE})")


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
        max_image_pixels=args.max_image_pixels, max_objects_per_image=args.max_objects_per_image,
    )
