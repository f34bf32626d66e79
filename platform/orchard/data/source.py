"""What a data source is, checked before Spark starts: kind, columns, slug and content hash.

Everything here is plain Python (csv, pyarrow, scikit-learn) so that a bad spec is refused in
milliseconds and an unchanged prep is recognised without starting a JVM.

``data.source`` may be a URI: ``file://`` is a local path; ``s3a://``, ``s3://``, ``gs://`` and ``hdfs://``
go to Spark as they are (a cluster reads them on its nodes), and only their header/schema is read here
through pyarrow's filesystems.

More forms: ``images:FOLDER`` (see ``orchard.data.images``), ``idx:``/``npy:``/``npz:`` arrays (see
``orchard.data.arrays``) and ``package:PKG/REL/PATH``, a file shipped inside an installed Python package,
found with importlib (no network).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from orchard.config import DataSpec, SpecError
from orchard.data import arrays, images, text
from orchard.data.manifest import slug

# Bump when the prep's output for the same input changes, so old folders are not reused.
PREP_VERSION = "orchard-data/4"  # 2: splits by feature vector; 3: vector hash over one array column;
# 4: float32 packing where exact (those sources' split keys hash other bytes)
SKLEARN_DATASETS = ("digits", "breast_cancer", "diabetes")
SKLEARN_TASKS = {"diabetes": "regression"}
DEFAULT_IMAGE_SHAPES = {"digits": [1, 8, 8]}
# Read by Spark where the job runs; the bytes cannot be hashed from here.
REMOTE_SCHEMES = ("s3a", "s3", "s3n", "gs", "gcs", "hdfs", "abfs", "abfss")


@dataclass(frozen=True)
class Source:
    kind: Literal["sklearn", "csv", "parquet", "images", "arrays", "text"]
    location: str  # the sklearn dataset name, the resolved file/folder path, or a remote URI as given
    slug: str
    columns: tuple[str, ...]  # every column the source has, in source order
    features: tuple[str, ...]  # numeric columns
    label: str
    categorical: tuple[str, ...] = ()
    remote: bool = False  # location is a URI that only Spark (and pyarrow) can open
    header: bool = True  # CSV: the first line names the columns
    image: tuple[int, ...] | None = None  # the image shape the source implies (images, IDX), if any
    split_column: str | None = None  # data.split.column: carried to the split step, never a feature

    def describe(self) -> str:
        if self.kind == "sklearn":
            return f"sklearn:{self.location}"
        if self.kind == "text":
            return f"{text.PREFIX}{self.location}"
        return f"images:{self.location}" if self.kind == "images" else self.location


def resolve(data: DataSpec) -> Source:
    """Find the source and its columns; refuse missing files/columns with a SpecError naming them."""
    not_numeric: dict[str, str] = {}
    shape: tuple[int, ...] | None = None
    if text.is_text_source(data.source) or data.task == "next_token":
        return _text_source(data)
    if data.source.startswith("sklearn:"):
        kind, location, columns = "sklearn", *_sklearn_columns(data.source, data.label)
    elif data.source.startswith(images.PREFIX):
        root = images.folder_of(data.source)
        images.check(root, data.image_shape, data.source)
        kind, location, shape = "images", str(root), tuple(data.image_shape)
        columns = [*_pixel_columns(_size(data.image_shape)), data.label]
    elif arrays.is_array_source(data.source):
        found = arrays.parse(data.source)
        _, sample = arrays.peek(found)
        kind, location = "arrays", found.describe()
        shape = tuple(arrays.default_image_shape(sample) or ()) or None
        extra = [arrays.SPLIT_COLUMN] if found.splits else []
        columns = [*_pixel_columns(_size(sample)), data.label, *extra]
    elif _scheme(data.source) in REMOTE_SCHEMES:
        kind = "csv" if data.source.lower().endswith(".csv") else "parquet"
        location = data.source
        columns, not_numeric = _remote_columns_of(kind, data.source)
    else:
        path = _package_path(data.source) if data.source.startswith("package:") else _local_path(data.source)
        if not path.exists():
            raise SpecError(f"data.source: {data.source} does not exist")
        if path.is_file() and is_csv(path.name):
            kind, columns = "csv", _csv_header(path, data.header)
        else:
            kind, (columns, not_numeric) = "parquet", _parquet_columns(path)
        location = str(path.resolve())
    categorical = _pick_categorical(data, columns, location, kind)
    numeric_only = {k: v for k, v in not_numeric.items() if k not in categorical}
    features = [c for c in _pick_features(data, columns, location, numeric_only, categorical) if c not in categorical]
    name = slug(location if kind == "sklearn" else _stem(location, kind))
    source = Source(kind, location, name, tuple(columns), tuple(features), data.label, tuple(categorical),
                    remote=_scheme(location) in REMOTE_SCHEMES, header=data.header, image=shape)
    return _with_split_column(source, data)


def _text_source(data: DataSpec) -> Source:
    """``shakespeare:ARCHIVE``: columns x0..x{seq_len-1} (character ids), label, user, split (see ``data.text``)."""
    if not text.is_text_source(data.source):
        raise SpecError(f"data.task: next_token needs a text source ({text.PREFIX}ARCHIVE), not {data.source}")
    if data.task != "next_token":
        raise SpecError(f"data.task: {data.source} is a text source; set data.task: next_token")
    if data.normalize != "none":
        raise SpecError("data.normalize: next_token features are character ids; set data.normalize: none")
    for key in ("features", "categorical", "image_shape", "sequence_shape"):
        if getattr(data, key):
            raise SpecError(f"data.{key}: a text source has no {key.replace('_', ' ')} (windows are data.seq_len "
                            "characters)")
    if data.split.column not in (None, text.SPLIT_COLUMN):
        raise SpecError(f"data.split.column: a text source splits each client in time order ({text.SPLIT_COLUMN!r})")
    archive = text.archive_of(data.source)
    features = tuple(_pixel_columns(data.seq_len))
    columns = (*features, data.label, text.USER_COLUMN, text.SPLIT_COLUMN)
    return Source("text", str(archive), "shakespeare", columns, features, data.label,
                  split_column=text.SPLIT_COLUMN)


def is_csv(name: str) -> bool:
    return name.lower().endswith((".csv", ".csv.gz"))


def _stem(location: str, kind: str) -> str:
    if kind == "arrays":
        location = location.split(":", 1)[1].split(",", 1)[0].split("#", 1)[0]
    name = Path(location).name
    if kind == "csv":
        return re.sub(r"(?i)\.csv(\.gz)?$", "", name)
    return name if kind == "images" else Path(location).stem


def _size(shape) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _pixel_columns(n: int) -> list[str]:
    return [f"x{i}" for i in range(n)]


def _with_split_column(source: Source, data: DataSpec) -> Source:
    """Check ``data.split.column`` and take it out of the default features."""
    column = data.split.column
    if column is None:
        return source
    if source.kind in ("sklearn", "images"):
        raise SpecError(f"data.split.column: {source.describe()} has no split column {column!r}")
    if column not in source.columns:
        raise SpecError(f"data.split.column: column {column!r} not found in {source.describe()} "
                        f"(columns: {_short(list(source.columns))})")
    if column == source.label or column in source.categorical:
        raise SpecError(f"data.split.column: {column!r} is also the label or a categorical column")
    if data.features is not None and column in data.features:
        raise SpecError(f"data.split.column: {column!r} cannot also be a feature (data.features)")
    features = tuple(f for f in source.features if f != column)
    if not features and not source.categorical:
        raise SpecError(f"data.features: {source.describe()} has no feature columns besides the label and "
                        f"data.split.column ({column!r})")
    return dataclasses.replace(source, features=features, split_column=column)


def _pick_categorical(data: DataSpec, columns: list[str], where: str, kind: str) -> list[str]:
    if not data.categorical:
        return []
    if kind == "sklearn":
        raise SpecError("data.categorical: the bundled sklearn datasets have no categorical columns")
    missing = [c for c in data.categorical if c not in columns]
    if missing:
        raise SpecError(f"data.categorical: {missing} not found in {where} (columns: {_short(columns)})")
    if data.label in data.categorical:
        raise SpecError(f"data.categorical: the label column {data.label!r} cannot also be a feature")
    return list(dict.fromkeys(data.categorical))


def content_hash(source: Source, data: DataSpec) -> str:
    """sha256 over the source's content and the data settings that change the output."""
    h = hashlib.sha256(PREP_VERSION.encode())
    if source.kind == "text":
        h.update(text.VERSION.encode())  # the parser and windowing: a change re-prepares text sources only
    if source.kind == "sklearn":
        import sklearn

        h.update(f"sklearn:{source.location}:{sklearn.__version__}".encode())
    elif source.remote:
        # Only the URI: a changed object under the same URI is not noticed (version your data paths).
        h.update(f"uri:{source.location}".encode())
    elif source.kind == "arrays":
        for file in arrays.parse(source.location).files:
            h.update(file.name.encode())
            _hash_file(h, file)
    else:
        root = Path(source.location)
        for file in content_files(root):
            # In a folder, which file holds which bytes is part of the content.
            h.update(file.relative_to(root).as_posix().encode() if root.is_dir() else b"")
            _hash_file(h, file)
    # Where the output goes and how Spark runs do not change what is produced; the text settings change
    # only a text source's output (left out otherwise, so other sources keep their folders).
    exclude = {"output", "spark"} | (set() if source.kind == "text" else {"seq_len", "text"})
    settings = data.model_dump(mode="json", exclude=exclude)
    h.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def image_shape(source: Source, data: DataSpec) -> list[int] | None:
    """The spec's image shape, checked against the feature count; digits defaults to [1, 8, 8]."""
    shape = data.image_shape
    if shape is None:
        # The default only fits when every pixel column is kept.
        keeps_all = data.features is None and source.kind in ("sklearn", "arrays")
        default = list(source.image) if source.image else DEFAULT_IMAGE_SHAPES.get(source.location)
        return default if keeps_all and default and _size(default) == len(source.features) else None
    size = 1
    for dim in shape:
        size *= dim
    if size != len(source.features):
        raise SpecError(
            f"data.image_shape: {shape} holds {size} values but {source.describe()} has "
            f"{len(source.features)} feature columns"
        )
    return list(shape)


def task_of(source: Source, data: DataSpec) -> str:
    """classification | regression: the spec's choice, else what the bundled dataset is for."""
    if data.task != "auto":
        return data.task
    return SKLEARN_TASKS.get(source.location, "classification") if source.kind == "sklearn" else "classification"


def _sklearn_columns(name: str, label: str) -> tuple[str, list[str]]:
    dataset = name.split(":", 1)[1]
    if dataset not in SKLEARN_DATASETS:
        known = ", ".join(f"sklearn:{d}" for d in SKLEARN_DATASETS)
        raise SpecError(f"data.source: unknown dataset {name!r} (known: {known})")
    return dataset, [*load_sklearn(dataset).feature_names, label]


def load_sklearn(dataset: str):
    """A bundled scikit-learn dataset (no download)."""
    from sklearn import datasets

    return getattr(datasets, f"load_{dataset}")()


def _csv_header(path: Path, header: bool = True) -> list[str]:
    # utf-8-sig: a byte-order mark must not become part of the first column's name.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
        if header:
            return _header_columns(fh, path)
        first = next(csv.reader(fh), None)
        if not first:
            raise SpecError(f"data.source: {path} is empty")
        return [f"c{i}" for i in range(len(first))]


def _header_columns(lines, path) -> list[str]:
    header = next(csv.reader(lines), None)
    if not header or not any(c.strip() for c in header):
        raise SpecError(f"data.source: {path} has no header row")
    columns = [c.strip() for c in header]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise SpecError(f"data.source: {path} has duplicate column names {dupes}")
    return columns


def _parquet_columns(path: Path | str, filesystem=None) -> tuple[list[str], dict[str, str]]:
    """Column names, and the type of each column that cannot hold a number."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        schema = ds.dataset(str(path), format="parquet", partitioning="hive", filesystem=filesystem).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise SpecError(f"data.source: {path} is neither a .csv file nor readable Parquet ({exc})") from None
    not_numeric = {f.name: str(f.type) for f in schema if not _castable_to_number(f.type)}
    return list(schema.names), not_numeric


def _castable_to_number(t) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_dictionary(t)
    )


def _pick_features(data: DataSpec, columns: list[str], where: str, not_numeric: dict[str, str],
                   categorical: list[str] = ()) -> list[str]:
    if data.label not in columns:
        raise SpecError(
            f"data.label: column {data.label!r} not found in {where} (columns: {_short(columns)})"
        )
    wanted = data.features if data.features is not None else [c for c in columns if c != data.label]
    wanted = [c for c in wanted if c not in categorical]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise SpecError(f"data.features: {missing} not found in {where} (columns: {_short(columns)})")
    if data.label in wanted:
        raise SpecError(f"data.features: the label column {data.label!r} cannot also be a feature")
    if not wanted:
        raise SpecError(f"data.features: {where} has no feature columns besides the label")
    for name in wanted:
        if name in not_numeric:
            raise SpecError(
                f"data.features: column {name!r} in {where} has type {not_numeric[name]}, not a number"
            )
    if len(set(wanted)) != len(wanted):
        raise SpecError(f"data.features: a column is listed twice in {wanted}")
    return list(wanted)


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def content_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # Spark ignores files whose name starts with "_" or "." (_SUCCESS, .crc), so the hash does too.
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)
    )


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def _scheme(source: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", source)
    return match.group(1).lower() if match else ""


def _package_path(source: str) -> Path:
    """``package:PKG/REL/PATH``: a file inside an installed package, found without importing it."""
    rest = source.split(":", 1)[1].strip("/")
    package, _, relative = rest.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(f"data.source: {source}: no installed package {package!r}")
    for base in spec.submodule_search_locations:
        if (Path(base) / relative).exists():
            return Path(base) / relative
    raise SpecError(f"data.source: {source}: package {package!r} has no file {relative!r}")


def _local_path(source: str) -> Path:
    """A plain path, or the path of a ``file://`` URI (``file:///abs/x.csv``, ``file://localhost/abs``)."""
    scheme = _scheme(source)
    if not scheme:
        return Path(source).expanduser()
    if scheme != "file":
        known = ", ".join(f"{s}://" for s in ("file", *REMOTE_SCHEMES))
        raise SpecError(f"data.source: unsupported URI scheme {scheme}:// in {source} (known: {known})")
    parsed = urlparse(source)
    if parsed.netloc not in ("", "localhost"):
        raise SpecError(f"data.source: {source} names host {parsed.netloc!r}; a file:// URI must be local "
                        "(file:///absolute/path)")
    return Path(unquote(parsed.path))


def _remote_columns_of(kind: str, uri: str) -> tuple[list[str], dict[str, str]]:
    """Header (CSV) or schema (Parquet) of a remote source, read through pyarrow's filesystems."""
    import pyarrow.fs as pafs

    # pyarrow knows s3:// where Hadoop says s3a:// or s3n://; Spark keeps the URI as written.
    arrow_uri = re.sub(r"^s3[an]://", "s3://", uri, flags=re.IGNORECASE)
    try:
        if arrow_uri.lower().startswith(("gs://", "gcs://")):
            from datetime import timedelta

            # The default retry policy keeps trying for 15 minutes when GCS is unreachable.
            fs, path = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=15)), arrow_uri.split("://", 1)[1]
        else:
            fs, path = pafs.FileSystem.from_uri(arrow_uri)
        if kind == "csv":
            with fs.open_input_stream(path) as fh:
                first = fh.read(1 << 16).decode("utf-8-sig").splitlines()[:1]
            return _header_columns(first, uri), {}
        return _parquet_columns(path, filesystem=fs)
    except SpecError as exc:
        raise SpecError(str(exc).replace(path, uri)) from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"data.source: cannot read {uri} from this machine ({exc}); check the URI and the "
                        "credentials in the environment") from None
