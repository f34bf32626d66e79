"""Row parsing in Arrow batches: raw records in, one feature vector (or one quarantine reason) per row out.

Spark hands this module's ``Parser`` the raw frame in Arrow batches (``mapInArrow``), so parsing,
finite checks and quarantine reasons cost the same few Catalyst nodes however many features a source
has; the work per feature is vectorized numpy/pyarrow inside the batch. It imports no Spark and no
other orchard module: Spark ships it to its Python workers by value (see ``readers.parse``), so a
cluster's workers need only numpy and pyarrow.

Input columns (see ``orchard.data.readers``): ``_row``, ``_line`` (the CSV record, or null),
``_problem`` (a structural problem found earlier, or null), then either the CSV record's fields (parsed
here from ``_line``), a feature vector ``_fv`` (arrays, images) or the feature columns ``_f0..`` (any
type), and ``_y`` (label), ``_k0..`` (categorical), ``_g`` (partition column), ``_s`` (source split).

Output columns (``OUTPUT``): ``_row``, ``_reason`` (null = clean), ``_raw`` (only for a quarantined
row: the record as read), ``_v`` (the features, see below), ``_k`` (trimmed categorical values, a
missing one ""), ``_lab`` (trimmed label), ``_g``, ``_s``.

A feature vector travels through Spark as ONE binary value: the row's features packed little-endian
(``pack``/``unpack``), -0.0 written 0.0. Spark moves, hashes, groups and compares it as a single value
(two rows have equal features exactly when their bytes are equal; NaN never gets this far), and numpy
reads a batch of them without a copy; an ``array<double>`` column would cost Spark's writer and shuffle
work per element. The values are float64, or float32 when every value the source's types can hold is a
float32 exactly (``Parser.narrow``: 8/16-bit integers, float32 — pixels, most Parquet tables): half the
bytes to stage and shuffle, the same numbers. One source uses one width for all its rows, so equal
features still mean equal bytes; every reader (``unpack``) tells the width from the row length and
computes in float64.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

OUTPUT = ("_row long, _reason string, _raw string, _v binary, _k array<string>, _lab string, "
          "_g string, _s string")
SPLIT_VALUES = ("train", "val", "test")
# What a numeric field may look like once trimmed (Arrow's cast then reads it); anything else is text.
_NUMBER = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$"
# A quoted CSV field with "" as the escaped quote (RFC 4180); removed before counting separators.
_QUOTED_FIELD = re.compile(r'"(?:[^"]|"")*"')
_EMPTY, _TEXT, _NONFINITE = 1, 2, 3  # why a feature value is unusable, in message order


@dataclass(frozen=True)
class Parser:
    """Everything a worker needs to parse one source's rows (picklable; no Spark objects)."""

    mode: str  # "csv" (fields from _line), "vector" (_fv), "columns" (_f0.._fN)
    features: tuple[str, ...]  # names, for messages and raw JSON
    label: str
    categorical: tuple[str, ...] = ()
    regression: bool = False
    group: str | None = None  # federated.partition_by
    split_column: str | None = None  # data.split.column
    width: int = 0  # CSV: fields per record
    index: tuple[int, ...] = ()  # CSV: field position of each feature, then categoricals, label, group, split
    narrow: bool = False  # every feature value the source can hold is a float32 exactly: pack float32

    @property
    def source_columns(self) -> list[str]:
        """The source columns a row is read from, in the raw frame's order: features, categorical, label,
        partition column, split column (``readers`` renames them ``_f*``, ``_k*``, ``_y``, ``_g``, ``_s``)."""
        return [*self.features, *self.categorical, self.label, *([self.group] if self.group else []),
                *([self.split_column] if self.split_column else [])]

    def __call__(self, batches):
        for batch in batches:
            if "_path" in batch.schema.names:  # Parquet pieces: read here, parsed batch by batch
                for piece in batch.to_pylist():
                    for raw in self.read_piece(piece["_path"], piece["_rg"], piece["_first"], piece["_rows"],
                                               piece["_skip"]):
                        yield self.parse(raw)
            else:
                yield self.parse(batch)

    def read_piece(self, path: str, row_group: int, first: int, rows: int, skip: int, batch_size: int = 10_000):
        """``rows`` rows of a Parquet row group from its row ``skip`` on, as raw batches (``readers``' columns),
        numbered from ``first`` + 1 (``first``: the source's rows before the slice)."""
        import pyarrow.parquet as pq

        names = self.source_columns
        renamed = [*(f"_f{i}" for i in range(len(self.features))),
                   *(f"_k{j}" for j in range(len(self.categorical))), "_y", *(["_g"] if self.group else []),
                   *(["_s"] if self.split_column else [])]
        table = pq.ParquetFile(path).read_row_group(row_group, columns=list(dict.fromkeys(names)))
        table = table.slice(skip, rows)
        at = first
        for batch in table.to_batches(max_chunksize=batch_size):
            n = batch.num_rows
            columns = {"_row": pa.array(np.arange(at + 1, at + n + 1, dtype=np.int64)),
                       "_line": pa.nulls(n, pa.string()), "_problem": pa.nulls(n, pa.string())}
            columns.update({new: batch.column(old) for old, new in zip(names, renamed, strict=True)})
            at += n
            yield pa.RecordBatch.from_pydict(columns)

    def parse(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        n = batch.num_rows
        problem = batch.column("_problem").to_pylist()
        if self.mode == "csv":
            fields, problem = self._csv_fields(batch.column("_line"), problem)
            values = [fields[i] for i in range(len(self.features))]
            rest = fields[len(self.features):]
            cats, rest = rest[: len(self.categorical)], rest[len(self.categorical):]
            label = rest[0]
            group = rest[1] if self.group else None
            split = rest[-1] if self.split_column else None
        else:
            values = None
            cats = [batch.column(f"_k{j}") for j in range(len(self.categorical))]
            label = batch.column("_y")
            group = batch.column("_g") if self.group else None
            split = batch.column("_s") if self.split_column else None
        reasons = list(problem)
        if split is not None:
            given = split
            split, bad = _split_values(split)
            _note(reasons, bad, lambda i: f"value in split column '{self.split_column}' is not train/val/test: "
                  f"{_shown(given[i].as_py())}")
        lab = _trimmed(label)
        _note(reasons, pc.fill_null(pc.equal(lab, ""), True),
              lambda i: f"empty label in column '{self.label}'")
        if self.regression:
            target = _to_double(lab)[0]
            bad = pc.or_(pc.is_null(target), pc.invert(pc.is_finite(pc.fill_null(target, 0.0))))
            _note(reasons, bad, lambda i: f"non-numeric target in column '{self.label}': {lab[i].as_py()}")
        if group is not None:
            group = _trimmed(group)
            _note(reasons, pc.fill_null(pc.equal(group, ""), True),
                  lambda i: f"empty value in column '{self.group}' (federated.partition_by)")
        x = self._features(batch, values, reasons)
        raw = self._raw(batch, reasons, x)
        k = _categorical(cats, n)
        v = pack(x, self.narrow)
        return pa.RecordBatch.from_arrays(
            [batch.column("_row"), pa.array(reasons, pa.string()), pa.array(raw, pa.string()), v, k,
             lab.cast(pa.string()), _or_nulls(group, n), _or_nulls(split, n)],
            names=["_row", "_reason", "_raw", "_v", "_k", "_lab", "_g", "_s"])

    def _features(self, batch: pa.RecordBatch, values, reasons: list) -> np.ndarray:
        """(rows, features) float64; the first unusable value of a row becomes its reason."""
        n, d = batch.num_rows, len(self.features)
        if self.mode == "vector":
            x, sizes = unpack_rows(batch.column("_fv"), d)
            for i in np.flatnonzero(sizes != d):
                if reasons[i] is None:
                    reasons[i] = f"expected {d} feature values, got {max(int(sizes[i]), 0)}"
            codes = np.where(np.isfinite(x), 0, _NONFINITE).astype(np.int8)
            shown = [_Column(x, i) for i in range(d)]
        else:
            columns = values if values is not None else [batch.column(f"_f{i}") for i in range(d)]
            x = np.empty((n, d))
            codes = np.zeros((n, d), dtype=np.int8)
            for i, col in enumerate(columns):
                x[:, i], codes[:, i] = _column(col)
            shown = columns
        x[x == 0] = 0.0  # -0.0 and 0.0 hash differently; one spelling keeps splits deterministic
        bad = codes.any(axis=1)
        if bad.any():
            first = (codes > 0).argmax(axis=1)
            for r in np.flatnonzero(bad):
                if reasons[r] is not None:
                    continue
                i = int(first[r])
                name = self.features[i]
                kind = int(codes[r, i])
                value = _shown(shown[i][r].as_py())
                reasons[r] = (f"empty value in column '{name}'" if kind == _EMPTY
                              else f"non-numeric value in column '{name}': {value}" if kind == _TEXT
                              else f"non-finite value in column '{name}': {value}")
        return x

    def _csv_fields(self, lines: pa.Array, problem: list) -> tuple[list[pa.Array], list]:
        """The record's fields used by this source (as strings), and the problems with field count/quoting.

        Well-formed records are parsed together by Arrow's CSV reader; a record it cannot take (or
        that the quick checks flag) is looked at on its own with Python's csv module.
        """
        text = lines.to_pylist()
        problem = list(problem)
        quoted = pc.fill_null(pc.match_substring(lines, '"'), False).to_numpy(zero_copy_only=False)
        commas = pc.fill_null(pc.count_substring(lines, ","), 0).to_numpy(zero_copy_only=False)
        for r, line in enumerate(text):
            if problem[r] is not None or line is None:
                continue
            if quoted[r]:
                problem[r] = _quoting_problem(line, self.width)
            elif commas[r] + 1 != self.width:
                problem[r] = f"expected {self.width} fields, got {commas[r] + 1}"
        good = [r for r, p in enumerate(problem) if p is None]
        names = [f"c{i}" for i in range(self.width)]
        wanted = [names[i] for i in self.index]
        table = None
        if good:
            body = "\n".join(text[r] for r in good).encode()
            try:
                table = pacsv.read_csv(
                    pa.py_buffer(body),
                    read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in names}, include_columns=wanted,
                        strings_can_be_null=False, quoted_strings_can_be_null=False))
            except pa.ArrowInvalid:
                table = None
            if table is not None and table.num_rows != len(good):
                table = None
            if table is None:  # one record Arrow refuses: find it with the stdlib reader
                rows = []
                for r in good:
                    parsed = next(csv.reader([text[r]]), [])
                    if len(parsed) != self.width:
                        problem[r] = "malformed CSV record"
                        rows.append([""] * self.width)
                    else:
                        rows.append(parsed)
                table = pa.table({c: pa.array([row[i] for row in rows], pa.string())
                                  for i, c in enumerate(names) if c in wanted})
        n = len(text)
        if table is None or not good:
            return [pa.nulls(n, pa.string()) for _ in wanted], problem
        if len(good) == n:
            return [table.column(c).combine_chunks() for c in wanted], problem
        # Rows with a structural problem get null fields (their reason is already set).
        at = np.full(n, -1, dtype=np.int64)
        at[good] = np.arange(len(good))
        take = pa.array(at, mask=at < 0)
        return [table.column(c).combine_chunks().take(take) for c in wanted], problem

    def _raw(self, batch: pa.RecordBatch, reasons: list, x: np.ndarray) -> list:
        """The record as read, for the rows that go to quarantine only."""
        bad = [r for r, reason in enumerate(reasons) if reason is not None]
        raw = [None] * batch.num_rows
        if not bad:
            return raw
        lines = batch.column("_line")
        for r in bad:
            raw[r] = lines[r].as_py()  # the CSV record, or an image's path
        if self.mode == "csv":
            return raw
        names = self.source_columns
        sources = self._raw_columns(batch, x)
        for r in bad:
            if raw[r] is not None:
                continue
            record = {}
            for name, col in zip(names, sources, strict=True):
                value = col[r].as_py() if col is not None else None
                if value is not None:
                    record[name] = _json_value(value)
            raw[r] = json.dumps(record, separators=(",", ":"))
        return raw

    def _raw_columns(self, batch: pa.RecordBatch, x: np.ndarray) -> list:
        cols = batch.schema.names
        if self.mode == "vector":
            features = [_Column(x, i) for i in range(len(self.features))]
        else:
            features = [batch.column(f"_f{i}") for i in range(len(self.features))]
        return [*features, *[batch.column(f"_k{j}") for j in range(len(self.categorical))], batch.column("_y"),
                *([batch.column("_g")] if self.group else []), *([batch.column("_s")] if "_s" in cols else [])]


class _Column:
    """Column i of a float matrix, indexable by row like an Arrow array."""

    def __init__(self, x: np.ndarray, i: int):
        self.x, self.i = x, i

    def __getitem__(self, r):
        return _Scalar(float(self.x[r, self.i]))


@dataclass
class _Scalar:
    value: object

    def as_py(self):
        return self.value


def pack(x: np.ndarray, narrow: bool = False) -> pa.Array:
    """Rows of a float matrix as one binary value each (little-endian float64, or float32 if ``narrow``:
    only for values that are float32s exactly)."""
    n, d = x.shape
    size = 4 if narrow else 8
    data = np.ascontiguousarray(x, dtype=f"<f{size}")
    offsets = np.arange(n + 1, dtype=np.int32) * (size * d)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def unpack(column: pa.Array, d: int) -> np.ndarray:
    """A binary column of packed rows (all d wide, float64 or float32) as an (n, d) float64 matrix: float64
    rows without a copy."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    if n == 0 or d == 0:
        return np.zeros((n, d))
    _, offsets, data = column.buffers()
    start, end = np.frombuffer(offsets, dtype=np.int32, count=2, offset=column.offset * 4)
    dtype = "<f4" if end - start == 4 * d else "<f8"
    x = np.frombuffer(data, dtype=dtype, count=n * d, offset=int(start)).reshape(n, d)
    return x.astype(np.float64) if dtype == "<f4" else x


def unpack_rows(column: pa.Array, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors given as packed binary or as lists: an (n, d) float64 matrix and each row's length.

    A row of the wrong length (or null) is left as zeros; the caller quarantines it by its length.
    """
    n = len(column)
    if pa.types.is_binary(column.type):
        sizes = pc.fill_null(pc.binary_length(column), -8).to_numpy(zero_copy_only=False) // 8
        if (sizes == d).all():
            return unpack(column, d).copy(), sizes
        x = np.zeros((n, d))
        for i in np.flatnonzero(sizes == d):
            x[i] = np.frombuffer(column[i].as_py(), dtype="<f8")
        return x, sizes
    sizes = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float64)
    if (sizes == d).all():
        return flat.reshape(n, d), sizes
    x = np.zeros((n, d))
    starts = np.concatenate([[0], np.cumsum(np.maximum(sizes, 0))])
    for i in np.flatnonzero(sizes == d):
        x[i] = flat[starts[i]:starts[i] + d]
    return x, sizes


def _column(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """One feature column as float64 and a problem code per row (0 = usable)."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values, codes = _to_double(col)
        return values.to_numpy(zero_copy_only=False), codes
    if pa.types.is_dictionary(col.type):
        return _column(col.cast(col.type.value_type))
    values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    missing = col.is_null().to_numpy(zero_copy_only=False)
    codes = np.where(missing, _EMPTY, np.where(np.isfinite(values), 0, _NONFINITE)).astype(np.int8)
    return values, codes


def _to_double(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Text to float64 (null where not a number) and a problem code per row."""
    trimmed = pc.utf8_trim_whitespace(col)
    empty = pc.fill_null(pc.equal(trimmed, ""), True).to_numpy(zero_copy_only=False)
    number = pc.fill_null(pc.match_substring_regex(trimmed, _NUMBER, ignore_case=True), False)
    values = pc.cast(pc.if_else(number, trimmed, pa.scalar(None, pa.string())), pa.float64())
    v = values.to_numpy(zero_copy_only=False)
    codes = np.where(empty, _EMPTY, np.where(~number.to_numpy(zero_copy_only=False), _TEXT,
                                             np.where(np.isfinite(v), 0, _NONFINITE))).astype(np.int8)
    return values, codes


def _trimmed(col: pa.Array) -> pa.Array:
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = _as_text(col)
    return pc.utf8_trim_whitespace(col)


def _as_text(col: pa.Array) -> pa.Array:
    """Numbers as Spark writes them as text: integers plainly, floats with a decimal point."""
    if pa.types.is_floating(col.type):
        return pa.array([None if v is None else _float_text(v) for v in col.to_pylist()], pa.string())
    return pc.cast(col, pa.string())


def _float_text(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


def _split_values(col: pa.Array) -> tuple[pa.Array, pa.Array]:
    value = pc.utf8_lower(_trimmed(col))
    bad = pc.invert(pc.fill_null(pc.is_in(value, pa.array(SPLIT_VALUES)), False))
    return value, bad


def _note(reasons: list, bad: pa.Array, message) -> None:
    """Give each flagged row without a reason yet the message for it (rows are few: called per bad row)."""
    flags = bad.to_numpy(zero_copy_only=False)
    for r in np.flatnonzero(flags):
        if reasons[r] is None:
            reasons[r] = message(int(r))


def _categorical(cols: list, n: int) -> pa.Array:
    if not cols:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.string()))
    values = [pc.fill_null(_trimmed(c), "") for c in cols]
    flat = [v for row in zip(*[c.to_pylist() for c in values], strict=True) for v in row]
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * len(cols), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.string()))


def _or_nulls(col, n: int) -> pa.Array:
    return pa.nulls(n, pa.string()) if col is None else col.cast(pa.string())


def _shown(value) -> str:
    if isinstance(value, float):
        return _float_text(value)
    return "(empty)" if value is None else str(value)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return _float_text(value)
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _quoting_problem(line: str, width: int) -> str | None:
    """A record with quotes: a quote left inside an unquoted field, or the wrong number of fields."""
    unquoted = _QUOTED_FIELD.sub("", line)
    if '"' in unquoted:
        return "malformed quoting"
    fields = unquoted.count(",") + 1
    return None if fields == width else f"expected {width} fields, got {fields}"


@dataclass(frozen=True)
class Scaler:
    """Rows of one split to the contract's values: scaled float32 features (+ category codes), label, group.

    The features leave packed too (float32, little-endian): ``write.finish_split`` turns them into the
    contract's ``fixed_size_list<float32>`` column without Spark touching each value.

    ``stats`` are the training split's (see ``normalize``): a zero scale counts as 1. Category code 0
    is a value the training split never saw; known values are 1 + their position in ``vocab``.
    """

    method: str
    width: int  # numeric features per packed row
    stats: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) or (min, max)
    vocab: tuple[tuple[str, ...], ...] = ()
    regression: bool = False
    grouped: bool = False

    def __call__(self, batches):
        for batch in batches:
            yield self.scale(batch)

    def scale(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        n = batch.num_rows
        x = unpack(batch.column("_v"), self.width)
        if self.method == "standard":
            mean, std = (np.asarray(s) for s in self.stats)
            x = (x - mean) / np.where(std == 0, 1.0, std)
        elif self.method == "minmax":
            low, high = (np.asarray(s) for s in self.stats)
            x = (x - low) / np.where(high - low == 0, 1.0, high - low)
        if self.vocab:
            k = batch.column("_k")
            codes = []
            for j, values in enumerate(self.vocab):
                item = pc.list_element(k, j)
                found = pc.index_in(item, value_set=pa.array(values, pa.string())) if values else pa.nulls(n, pa.int32())
                codes.append(pc.fill_null(pc.add(found, 1), 0).to_numpy(zero_copy_only=False))
            x = np.concatenate([x, np.stack(codes, axis=1).astype(np.float64)], axis=1)
        x = np.ascontiguousarray(x, dtype="<f4")
        offsets = np.arange(n + 1, dtype=np.int32) * (4 * x.shape[1])
        features = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(x)])
        label = batch.column("label").cast(pa.float64() if self.regression else pa.int64())
        columns, names = [features, label], ["features", "label"]
        if self.grouped:
            columns.append(batch.column("_g").cast(pa.string()))
            names.append("group")
        if "split" in batch.schema.names:  # carried through for the writer's partitioning
            columns.append(batch.column("split").cast(pa.string()))
            names.append("split")
        return pa.RecordBatch.from_arrays(columns, names=names)


@dataclass(frozen=True)
class Moments:
    """Per batch of packed rows: count, mean, sum of squared deviations, min and max of each feature.

    The driver merges the batches' figures (``merge``, Chan et al.'s pairwise update): one streaming pass
    in float64, whatever the width, with nothing but these few numbers per batch leaving the workers.
    """

    width: int
    SCHEMA = "n long, mean binary, m2 binary, low binary, high binary"

    def __call__(self, batches):
        for batch in batches:
            if batch.num_rows == 0:
                continue
            x = unpack(batch.column("_v"), self.width)
            mean = x.mean(axis=0)
            m2 = ((x - mean) ** 2).sum(axis=0)
            yield pa.RecordBatch.from_arrays(
                [pa.array([len(x)], pa.int64()), *(pa.array([np.ascontiguousarray(v, "<f8").tobytes()], pa.binary())
                                                    for v in (mean, m2, x.min(axis=0), x.max(axis=0)))],
                names=["n", "mean", "m2", "low", "high"])


def merge(parts: list, width: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n, mean, m2, min, max) of the whole from ``Moments`` rows (dicts or Rows with those fields)."""
    n, mean, m2 = 0, np.zeros(width), np.zeros(width)
    low, high = np.full(width, np.inf), np.full(width, -np.inf)
    for p in parts:
        k = int(p["n"])
        pm, pm2 = np.frombuffer(p["mean"], "<f8"), np.frombuffer(p["m2"], "<f8")
        delta = pm - mean
        total = n + k
        mean = mean + delta * (k / total)
        m2 = m2 + pm2 + delta**2 * (n * k / total)
        n = total
        low, high = np.minimum(low, np.frombuffer(p["low"], "<f8")), np.maximum(high, np.frombuffer(p["high"], "<f8"))
    return n, mean, m2, low, high
