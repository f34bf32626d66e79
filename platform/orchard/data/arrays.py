"""Array sources read with numpy on the driver: IDX files (the MNIST family) and NumPy ``.npy``/``.npz``.

Source forms (``data.source``):
    idx:IMAGES,LABELS       an ``*-idx3-ubyte[.gz]`` image file and its ``*-idx1-ubyte[.gz]`` label file
    idx:FOLDER              every ``<prefix>-images-idx3-ubyte[.gz]`` / ``<prefix>-labels-idx1-ubyte[.gz]`` pair in
                            the folder; prefix ``train`` -> train, ``t10k``/``test`` -> test, ``val`` -> val,
                            kept in a column ``split`` (use it with ``data.split.column: split``)
    npy:FEATURES,LABELS     two ``.npy`` files: features (n, ...) and labels (n,)
    npz:FILE[#XKEY,YKEY]    one ``.npz`` archive, keys ``x`` and ``y`` unless named

The whole source is loaded into memory (fine for data that fits the driver); each sample is flattened
in C order into feature columns ``x0..x{d-1}``. Plain Python: nothing here starts Spark.
"""

from __future__ import annotations

import gzip
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchard.config import SpecError

PREFIXES = ("idx:", "npy:", "npz:")
SPLIT_COLUMN = "split"  # the column an idx:FOLDER source adds
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PAIR = re.compile(r"^(?P<prefix>.+?)[-_.]images[-_.]idx3[-_.]ubyte(?P<gz>\.gz)?$", re.IGNORECASE)
_SPLIT_OF_PREFIX = {"train": "train", "t10k": "test", "test": "test", "val": "val", "valid": "val"}


@dataclass(frozen=True)
class Arrays:
    form: str  # idx | npy | npz
    files: tuple[Path, ...]  # every file read, in a fixed order (hashed for the content hash)
    keys: tuple[str, str] = ("x", "y")  # npz only
    splits: tuple[str, ...] = ()  # idx:FOLDER: the split of each (images, labels) pair

    def describe(self) -> str:
        if self.form == "npz":
            return f"npz:{self.files[0]}" + ("" if self.keys == ("x", "y") else f"#{','.join(self.keys)}")
        if self.splits:
            return f"idx:{self.files[0].parent}"
        return f"{self.form}:{','.join(str(f) for f in self.files)}"


def is_array_source(source: str) -> bool:
    return source.startswith(PREFIXES)


def parse(source: str) -> Arrays:
    """The files a ``idx:``/``npy:``/``npz:`` source names, checked to exist."""
    form, rest = source.split(":", 1)
    if form == "npz":
        file, _, keys = rest.partition("#")
        names = tuple(k.strip() for k in keys.split(",")) if keys else ("x", "y")
        if len(names) != 2 or not all(names):
            raise SpecError(f"data.source: {source}: name two keys after '#', e.g. npz:FILE.npz#images,labels")
        return Arrays("npz", (_existing(file, source),), names)
    parts = [p.strip() for p in rest.split(",")]
    if form == "idx" and len(parts) == 1:
        return _idx_folder(_existing(parts[0], source), source)
    if len(parts) != 2 or not all(parts):
        what = "IMAGES,LABELS (or a folder)" if form == "idx" else "FEATURES.npy,LABELS.npy"
        raise SpecError(f"data.source: {source}: expected {form}:{what}")
    return Arrays(form, tuple(_existing(p, source) for p in parts))


def peek(arrays: Arrays) -> tuple[int, tuple[int, ...]]:
    """(rows, shape of one sample), reading headers only where the format allows."""
    if arrays.form == "idx":
        shapes = [_idx_header(f)[1] for f in arrays.files]
        pairs = list(zip(shapes[::2], shapes[1::2], strict=True))
        for (images, labels), (fi, fl) in zip(pairs, zip(arrays.files[::2], arrays.files[1::2], strict=True),
                                              strict=True):
            if len(labels) != 1 or images[0] != labels[0]:
                raise SpecError(f"data.source: {fl} holds labels of shape {labels}, which does not match the "
                                f"{images[0]} images of {fi}")
        sample = {images[1:] for images, _ in pairs}
        if len(sample) != 1:
            raise SpecError(f"data.source: the IDX image files hold different image shapes {sorted(sample)}")
        return sum(images[0] for images, _ in pairs), sample.pop()
    x, y = _xy_lazy(arrays)
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise SpecError(f"data.source: {arrays.describe()}: features of shape {x.shape} and labels of shape "
                        f"{y.shape} do not pair up (need (n, ...) and (n,))")
    return int(x.shape[0]), tuple(int(d) for d in x.shape[1:])


def load(arrays: Arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(features as (n, d), labels (n,), split per row or None)."""
    if arrays.form == "idx":
        xs, ys, ss = [], [], []
        for i in range(0, len(arrays.files), 2):
            x, y = _idx_data(arrays.files[i]), _idx_data(arrays.files[i + 1])
            xs.append(x.reshape(len(x), -1))
            ys.append(y)
            if arrays.splits:
                ss.append(np.full(len(y), arrays.splits[i // 2], dtype=object))
        return np.concatenate(xs), np.concatenate(ys), (np.concatenate(ss) if ss else None)
    x, y = _xy_lazy(arrays)
    x, y = np.asarray(x), np.asarray(y)
    return x.reshape(len(x), -1), y, None


def feature_dtype(arrays: Arrays) -> np.dtype:
    """The features' dtype, from the headers (npz: its member's .npy header, so the array is read once)."""
    if arrays.form == "idx":
        return np.result_type(*(np.dtype(_idx_header(f)[0]) for f in arrays.files[::2]))
    if arrays.form == "npz":
        import zipfile

        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        try:
            with zipfile.ZipFile(arrays.files[0]) as archive, archive.open(f"{arrays.keys[0]}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                if version in readers:
                    return readers[version](fh)[2]
        except (KeyError, OSError, ValueError, zipfile.BadZipFile):
            pass  # _xy_lazy names the problem
    return _xy_lazy(arrays)[0].dtype


def default_image_shape(sample: tuple[int, ...]) -> list[int] | None:
    """[1, H, W] for a source of 2-D samples (grayscale images); nothing to guess otherwise."""
    return [1, *sample] if len(sample) == 2 else None


def _existing(text: str, source: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise SpecError(f"data.source: {path} (in {source}) does not exist")
    return path.resolve()


def _idx_folder(folder: Path, source: str) -> Arrays:
    files, splits = [], []
    for images in sorted(folder.iterdir()):
        match = _IDX_PAIR.match(images.name)
        if not match:
            continue
        prefix = match["prefix"]
        labels = [folder / f"{prefix}-labels-idx1-ubyte{gz}" for gz in (".gz", "")]
        label = next((p for p in labels if p.exists()), None)
        if label is None:
            raise SpecError(f"data.source: {images} has no label file {labels[1].name}[.gz] beside it")
        split = _SPLIT_OF_PREFIX.get(prefix.lower())
        if split is None:
            raise SpecError(f"data.source: cannot tell the split of {images.name} (prefix {prefix!r}; known: "
                            f"{', '.join(_SPLIT_OF_PREFIX)})")
        files += [images, label]
        splits.append(split)
    if not files:
        raise SpecError(f"data.source: {source}: no *-images-idx3-ubyte[.gz] files in {folder}")
    return Arrays("idx", tuple(files), splits=tuple(splits))


def _open(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _idx_header(path: Path) -> tuple[str, tuple[int, ...]]:
    with _open(path) as fh:
        head = fh.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES:
            raise SpecError(f"data.source: {path} is not an IDX file (bad magic number {head.hex()})")
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
    return _IDX_TYPES[head[2]], tuple(dims)


def _idx_data(path: Path) -> np.ndarray:
    dtype, dims = _idx_header(path)
    with _open(path) as fh:
        fh.read(4 + 4 * len(dims))
        data = np.frombuffer(fh.read(), dtype=dtype)
    size = int(np.prod(dims))
    if data.size != size:
        raise SpecError(f"data.source: {path} holds {data.size} values, its header promises {size}")
    return data.reshape(dims)


def _xy_lazy(arrays: Arrays):
    try:
        if arrays.form == "npy":
            return tuple(np.load(f, mmap_mode="r", allow_pickle=False) for f in arrays.files)
        archive = np.load(arrays.files[0], allow_pickle=False)
        missing = [k for k in arrays.keys if k not in archive.files]
        if missing:
            raise SpecError(f"data.source: {arrays.files[0]} has no key(s) {missing} (keys: {archive.files}); "
                            "name them as npz:FILE.npz#XKEY,YKEY")
        return archive[arrays.keys[0]], archive[arrays.keys[1]]
    except (ValueError, OSError) as exc:
        raise SpecError(f"data.source: cannot read {arrays.describe()} with numpy ({exc})") from None
