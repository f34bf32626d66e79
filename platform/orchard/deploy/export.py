"""``orchard export``: a run's logged model as ONNX or TorchScript, checked and measured, logged back to the run.

Steps: load the run's model and its prepared TEST split → convert (dynamic batch axis) → run the file
(onnxruntime, or torch for TorchScript) on every test row and compare with PyTorch: max abs difference of
the outputs and the fraction of rows whose predicted class agrees (refused below ``MIN_AGREEMENT``) →
optionally quantize to int8 → measure each file's size, test accuracy and CPU latency per row → log the
files, ``report.<format>.json`` and ``export/*`` metrics to the same run.

int8: ONNX models with convolutions get static quantization (QDQ, per-channel weights) calibrated on a
seeded sample of the TRAIN split: dynamic quantization leaves Conv in float, so a CNN would barely change.
Other ONNX models and every TorchScript model get dynamic quantization of their Linear/MatMul weights
(``torch.ao`` has no static path without a re-trace: a TorchScript CNN keeps its convolutions in float).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

FORMATS = ("onnx", "torchscript")
QUANTIZE = ("int8",)
MIN_AGREEMENT = 0.999  # fraction of test rows whose predicted class must match PyTorch's
CALIBRATION_ROWS, CALIBRATION_BATCH, SEED = 1024, 64, 0
LATENCY_BATCH, LATENCY_REPEATS, LATENCY_WARMUP, THREADS = 256, 30, 3, 1
INPUT, OUTPUT = "features", "logits"
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportError(ValueError):
    """Bad input: unknown run or model, unsupported format, no prepared data. Exit 2."""


class ParityError(RuntimeError):
    """The exported file does not predict what the PyTorch model predicts. Exit 1."""


@dataclass
class Variant:
    """One file of the export, measured on the run's test split."""

    precision: str  # fp32 | int8
    artifact: str
    size_bytes: int
    test_accuracy: float | None  # None for regression
    latency_ms_per_row: float
    max_abs_diff: float  # against the PyTorch model's outputs
    agreement: float  # fraction of rows whose predicted class (or value, within tolerance) matches PyTorch's


@dataclass
class ExportReport:
    run_id: str
    model_uri: str
    format: str
    quantization: str | None  # None | dynamic | static
    test_rows: int
    threads: int = THREADS
    latency_batch: int = LATENCY_BATCH
    variants: list[Variant] = field(default_factory=list)

    @property
    def artifact(self) -> str:
        return f"export/report.{self.format}.json"

    def metrics(self) -> dict[str, float]:
        """``export/onnx_max_abs_diff``… and, per precision, ``export/fp32_test_accuracy``… (TorchScript's
        measurements carry a ``torchscript_`` prefix so both exports of one run keep their own figures)."""
        fp32 = self.variants[0]
        out = {f"export/{self.format}_max_abs_diff": fp32.max_abs_diff,
               f"export/{self.format}_argmax_agreement": fp32.agreement}
        prefix = "" if self.format == "onnx" else f"{self.format}_"
        for v in self.variants:
            if v.test_accuracy is not None:
                out[f"export/{prefix}{v.precision}_test_accuracy"] = v.test_accuracy
            out[f"export/{prefix}{v.precision}_size_bytes"] = v.size_bytes
            out[f"export/{prefix}{v.precision}_latency_ms_per_row"] = v.latency_ms_per_row
        if len(self.variants) > 1:
            out[f"export/{prefix}int8_max_abs_diff"] = self.variants[1].max_abs_diff
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "artifact": self.artifact, "metrics": self.metrics()}


def export_model(model_uri: str, fmt: str, quantize: str | None = None, tracking_uri: str | None = None) -> ExportReport:
    """Export, check and measure the model ``model_uri`` names, and log the result to its run."""
    from orchard.tracking.exported import RunLookupError, load_run_model, log_export

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported; valid: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize!r} is not supported; valid: {', '.join(QUANTIZE)}")
    try:
        source = load_run_model(model_uri, tracking_uri)
    except RunLookupError as exc:
        raise ExportError(str(exc)) from None
    prepared = _prepared(source)
    model = _eager_model(source, prepared.manifest)
    from orchard.data.manifest import read_split

    x, y = read_split(prepared, "test")
    if len(x) == 0:
        raise ExportError(f"the test split of {prepared.path} is empty: nothing to check the export against")
    regression = prepared.manifest.get("task") == "regression"
    reference = _torch_outputs(model, x)
    report = ExportReport(source.run_id, source.model_uri, fmt, None, len(x))
    with tempfile.TemporaryDirectory(prefix="orchard-export-") as tmp:
        folder = Path(tmp)
        path = folder / f"model{'' if fmt == 'onnx' else '.torchscript'}{SUFFIX[fmt]}"
        (_to_onnx if fmt == "onnx" else _to_torchscript)(model, x[: min(len(x), 2)], path)
        fp32 = _measure("fp32", path, fmt, x, y, reference, regression)
        if fp32.agreement < MIN_AGREEMENT:
            raise ParityError(
                f"the {fmt} export of run {source.run_id} predicts the PyTorch model's class on only "
                f"{fp32.agreement:.2%} of {len(x)} test rows (needs {MIN_AGREEMENT:.1%}); max abs difference "
                f"{fp32.max_abs_diff:.3g}: nothing was logged")
        report.variants.append(fp32)
        if quantize:
            qpath = path.with_name(path.name.replace(SUFFIX[fmt], f".int8{SUFFIX[fmt]}"))
            if fmt == "onnx":
                report.quantization = _quantize_onnx(path, qpath, prepared)
            else:
                report.quantization = _quantize_torchscript(model, x[: min(len(x), 2)], qpath)
            report.variants.append(_measure("int8", qpath, fmt, x, y, reference, regression))
        (folder / Path(report.artifact).name).write_text(json.dumps(report.to_dict(), indent=2))
        log_export(source, folder, "export", report.metrics())
    return report


def _prepared(source):
    from orchard.data.manifest import load_manifest

    if source.prepared_path is None or not (source.prepared_path / "manifest.json").is_file():
        where = "records no prepared data" if source.prepared_path is None else \
            f"points at {source.prepared_path}, which has no manifest.json (moved or deleted?)"
        raise ExportError(f"run {source.run_id} {where}: the export is checked on the run's test split")
    return load_manifest(source.prepared_path)


def _eager_model(source, manifest: dict) -> nn.Module:
    """The run's architecture rebuilt from its spec with the logged weights (a plain ``nn.Module``, which
    ``torch.jit`` and ``torch.ao`` need), else the logged module as loaded."""
    module = source.module
    if source.spec_yaml:
        try:
            import yaml

            from orchard.config import validate_spec
            from orchard.models.registry import build_model

            rebuilt = build_model(validate_spec(yaml.safe_load(source.spec_yaml)), manifest)
            rebuilt.load_state_dict(module.state_dict())
            module = rebuilt
        except Exception:  # noqa: BLE001 - a spec this version cannot read: the logged module still exports
            pass
    return module.cpu().eval()


# -- conversion ---------------------------------------------------------------------------------------

def _to_onnx(model: nn.Module, example: np.ndarray, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch")
    # The exporter logs a warning per torchvision op it cannot register when torchvision is absent.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        program = torch.onnx.export(model, (torch.from_numpy(example),), dynamo=True, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path), external_data=False)


def _to_torchscript(model: nn.Module, example: np.ndarray, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # torch.jit is deprecated in 2.13
        traced = torch.jit.trace(model, torch.from_numpy(example))
        torch.jit.save(traced, str(path))


def _quantize_onnx(path: Path, out: Path, prepared) -> str:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = path.with_name("pre.onnx.tmp")
    quant_pre_process(str(path), str(pre))
    convolutional = any(n.op_type == "Conv" for n in onnx.load(str(pre)).graph.node)
    if not convolutional:
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
        pre.unlink()
        return "dynamic"
    rows = _calibration_rows(prepared)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([rows[i : i + CALIBRATION_BATCH] for i in range(0, len(rows), CALIBRATION_BATCH)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    return "static"


def _calibration_rows(prepared) -> np.ndarray:
    import numpy as np

    from orchard.data.manifest import read_features

    train = read_features(prepared, "train")
    pick = np.random.default_rng(SEED).permutation(len(train))[:CALIBRATION_ROWS]
    return np.ascontiguousarray(train[np.sort(pick)])


def _quantize_torchscript(model: nn.Module, example: np.ndarray, out: Path) -> str:
    import copy

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))  # torch.ao: deprecated
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                           dtype=torch.qint8)
    _to_torchscript(quantized, example, out)
    return "dynamic"


# -- checking and measuring ----------------------------------------------------------------------------

def _torch_outputs(model, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    import numpy as np
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).float().numpy()
                               for i in range(0, len(x), batch)])


def _predictor(path: Path, fmt: str):
    """A function rows -> outputs for the exported file, on ``THREADS`` CPU threads."""
    import numpy as np

    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = THREADS
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda rows: session.run(None, {INPUT: rows})[0]
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        loaded = torch.jit.load(str(path))
    loaded.eval()
    return lambda rows: np.asarray(_torch_outputs(loaded, rows))


def predictions(out: np.ndarray, regression: bool = False) -> np.ndarray:
    """Class per row: argmax, or for one logit (a BCE-trained binary model) logit > 0; regression: the value."""
    if regression:
        return out.reshape(len(out), -1)[:, 0]
    out = out.reshape(len(out), -1)
    return (out[:, 0] > 0).astype("int64") if out.shape[1] == 1 else out.argmax(1)


def _agreement(ref: np.ndarray, got: np.ndarray, regression: bool) -> float:
    import numpy as np

    a, b = predictions(ref, regression), predictions(got, regression)
    same = np.isclose(a, b, rtol=1e-3, atol=1e-3) if regression else a == b
    return float(np.mean(same))


def _measure(precision: str, path: Path, fmt: str, x, y, reference, regression: bool) -> Variant:
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # TorchScript runs on torch's pool; onnxruntime's is set per session
    try:
        predict = _predictor(path, fmt)
        got = np.asarray(predict(x), dtype=np.float32).reshape(reference.shape)
        latency = _latency_ms_per_row(predict, x)
    finally:
        torch.set_num_threads(threads)
    accuracy = None if regression else float(np.mean(predictions(got) == y))
    return Variant(precision, f"export/{path.name}", path.stat().st_size, accuracy, latency,
                   float(np.max(np.abs(got - reference))), _agreement(reference, got, regression))


def _latency_ms_per_row(predict, x: np.ndarray) -> float:
    """Median over repeats of one batch of ``LATENCY_BATCH`` test rows (tiled when the split is smaller)."""
    import numpy as np

    batch = np.ascontiguousarray(np.resize(x, (LATENCY_BATCH, x.shape[1])))
    for _ in range(LATENCY_WARMUP):
        predict(batch)
    times = []
    for _ in range(LATENCY_REPEATS):
        t0 = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000 / LATENCY_BATCH


def report_table(report: ExportReport):
    """The export's figures as a rich table: one row per file."""
    from rich.table import Table

    table = Table(title=f"orchard export {report.format} (run {report.run_id}, {report.test_rows} test rows, "
                        f"latency: batches of {report.latency_batch}, {report.threads} CPU thread)")
    for col in ("file", "size", "test accuracy", "µs/row", "max |Δ| vs torch", "class agreement"):
        table.add_column(col)
    for v in report.variants:
        acc = "–" if v.test_accuracy is None else f"{v.test_accuracy:.4f}"
        table.add_row(v.artifact, f"{v.size_bytes / 1024:,.1f} KiB", acc, f"{v.latency_ms_per_row * 1000:.2f}",
                      f"{v.max_abs_diff:.2e}", f"{v.agreement:.2%}")
    return table
