"""Image folders: ``images:FOLDER`` with one sub-folder per class holding PNG/JPEG files of any size.

Spark lists and reads the files (``binaryFile``); Pillow decodes them in Arrow batches
(``mapInArrow``) and resizes each to ``data.image_shape`` [C, H, W] (C = 1 grayscale, 3 RGB), pixel
values 0..255 in C-major order. The label is the class sub-folder's name. A file Pillow cannot decode
becomes a row with a problem (``unreadable image: ...``) and is quarantined under its path; a file
outside a class sub-folder is quarantined too. Rows are numbered by path, so numbering does not depend
on partitioning.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchard.config import SpecError

if TYPE_CHECKING:  # the resolver imports this module without Spark; read() imports it when it runs
    from pyspark.sql import DataFrame, SparkSession

PREFIX = "images:"
EXTENSIONS = ("png", "jpg", "jpeg")
_GLOB = "*.{" + ",".join(e for ext in EXTENSIONS for e in (ext, ext.upper())) + "}"


def folder_of(source: str) -> Path:
    path = Path(source[len(PREFIX):]).expanduser()
    if not path.is_dir():
        raise SpecError(f"data.source: {source}: {path} is not a folder")
    return path.resolve()


def check(root: Path, shape: list[int] | None, source: str) -> list[str]:
    """The class names (sorted sub-folder names); refuses a missing or unusable image_shape."""
    if shape is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise SpecError(f"data.image_shape: {source} needs [C, H, W] with C = 1 (grayscale) or 3 (RGB) to "
                        f"resize its images to, got {shape}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if len(classes) < 2:
        raise SpecError(f"data.source: {source} needs one sub-folder per class (at least 2), found {classes}")
    return classes


def read(spark: SparkSession, root: Path, shape: list[int]) -> DataFrame:
    """Raw frame: ``_row`` (by path), ``_line`` (the file's path), ``_problem``, ``_fv`` (pixels packed as
    float64, see ``rowparse``), ``_y`` (class)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", _GLOB).load(str(root)))
    decode = _decoder(str(root), list(shape))
    decoded = files.select("path", "content").mapInArrow(
        decode, "path string, label string, problem string, pixels binary")
    numbered = decoded.select("*", F.row_number().over(Window.orderBy("path")).cast("long").alias("_row"))
    return numbered.select("_row", F.col("path").alias("_line"), F.col("problem").alias("_problem"),
                           F.col("pixels").alias("_fv"), F.col("label").alias("_y"))


def _decoder(root: str, shape: list[int]):
    """A picklable batch function (no orchard imports: it runs in Spark's Python workers)."""

    def decode(batches):
        import io
        from pathlib import PurePosixPath
        from urllib.parse import unquote, urlparse

        import numpy as np
        import pyarrow as pa
        from PIL import Image

        channels, height, width = shape
        mode = "L" if channels == 1 else "RGB"
        base = PurePosixPath(root)
        for batch in batches:
            paths, labels, problems, pixels = [], [], [], []
            for uri, content in zip(batch.column("path").to_pylist(), batch.column("content").to_pylist(),
                                    strict=True):
                local = PurePosixPath(unquote(urlparse(uri).path))
                paths.append(str(local))
                try:
                    parts = local.relative_to(base).parts
                except ValueError:
                    parts = local.parts[-2:]
                labels.append(parts[0] if len(parts) > 1 else None)
                if len(parts) < 2:
                    problems.append("image is not inside a class sub-folder")
                    pixels.append(None)
                    continue
                try:
                    with Image.open(io.BytesIO(content)) as img:
                        img = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                        array = np.asarray(img, dtype=np.float32)
                except Exception as exc:  # noqa: BLE001 - any decoder error means the file is unusable
                    problems.append(f"unreadable image: {exc}")
                    pixels.append(None)
                    continue
                array = array[None] if channels == 1 else array.transpose(2, 0, 1)
                problems.append(None)
                pixels.append(array.reshape(-1))
            yield pa.RecordBatch.from_arrays(
                [pa.array(paths, pa.string()), pa.array(labels, pa.string()), pa.array(problems, pa.string()),
                 pa.array([None if p is None else p.astype("<f8").tobytes() for p in pixels], pa.binary())],
                names=["path", "label", "problem", "pixels"],
            )

    return decode
