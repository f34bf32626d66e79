"""Explanations: Captum attributions of a trained model on a fixed, seeded sample of the test split.

Two ways in: ``explain_job`` from the runner, right after the model is logged (the spec's ``explain:``
section), and ``explain_run`` for ``orchard explain RUN_ID``, which loads the model the run logged and
finds the test split through the run's dataset inputs. Both run on the driver's CPU; the sample is small,
so they cost seconds. ``attribute.py`` computes (torch + Captum), ``report.py`` writes to the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import PurePosixPath
from typing import Any

from orchard.config import ExplainSpec, JobSpec, SpecError

_log = logging.getLogger("orchard.explain")


def explain(model, prepared, spec: ExplainSpec):
    """Attributions of ``model`` (CPU, eval mode) for ``spec.samples`` seeded rows of ``prepared``'s test split."""
    import numpy as np

    from orchard.data.manifest import read_features, read_head
    from orchard.explain.attribute import TRAIN_MEAN_ROWS, attribute, baseline_for, sample_rows

    m = prepared.manifest
    test = read_features(prepared, "test")
    rows = sample_rows(len(test), spec.samples, spec.seed)
    x = np.ascontiguousarray(test[rows])
    head = read_head(prepared, "train", TRAIN_MEAN_ROWS) if spec.baseline == "train_mean" else None
    base = baseline_for(x, spec.baseline, head, categorical=len(m.get("categorical") or []))
    att = attribute(model, x, spec, base, classification=m.get("task") != "regression")
    att.rows = rows
    return att


def explain_and_log(sink, model, prepared, spec: ExplainSpec, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``explain`` then ``report.log_explanation`` on ``sink``; returns the summary (with the seconds it took)."""
    from orchard.explain.report import log_explanation

    t0 = time.perf_counter()
    att = explain(model, prepared, spec)
    extra = {**(extra or {}), "seconds": round(time.perf_counter() - t0, 3)}
    return log_explanation(sink, att, prepared.manifest, spec, extra)


def explain_job(job, spec: JobSpec, prepared, model) -> dict[str, Any] | None:
    """The runner's step: explain the job's final model on its own run. A failure here is logged as a
    warning and a tag (``orchard.explain_error``), not raised: the model is trained and logged already."""
    from orchard.tracking import TrackingUnavailable

    if spec.explain is None:
        return None
    try:
        return explain_and_log(job, model.cpu().eval(), prepared, spec.explain, {"run_id": job.run_id})
    except TrackingUnavailable:  # the run's own outage handling (buffer, FAILED status) applies, as for the model
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        _log.warning("explain: %s: %s", type(exc).__name__, exc)
        job.set_tags({"orchard.explain_error": f"{type(exc).__name__}: {exc}"[:500]})
        return None


def explain_run(run_id: str, uri: str | None = None, **settings: Any) -> dict[str, Any]:
    """Explain the model that run ``run_id`` logged, and log the results to that run.

    ``settings`` (method, samples, steps, baseline, seed; None = unset) override the run's own
    ``explain:`` section, else ``ExplainSpec``'s defaults. Bad input (unknown run, no model, the prepared
    data gone) is a ``SpecError``.
    """
    from pydantic import ValidationError

    from orchard.data.manifest import PreparedData
    from orchard.tracking.logged import LoggedRun

    run = LoggedRun(run_id, uri)
    logged = {k.removeprefix("explain."): v for k, v in run.params.items() if k.startswith("explain.")}
    try:
        spec = ExplainSpec.model_validate({**logged, **{k: v for k, v in settings.items() if v is not None}})
    except ValidationError as exc:
        raise SpecError("explain: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                  for e in exc.errors())) from None
    manifest = run.manifest()
    folders = run.split_folders()
    if "test" not in folders:
        raise SpecError(f"run {run_id}: it recorded no test split among its dataset inputs")
    depth = len(PurePosixPath(manifest["splits"]["test"]).parts)  # the split's folder, relative to the prepared one
    root = folders["test"].parents[depth - 1]
    prepared = PreparedData(path=root, manifest=manifest)
    if not prepared.split_path("test").is_dir():
        raise SpecError(f"run {run_id}: its prepared test split {prepared.split_path('test')} is gone; "
                        "prepare the data again with `orchard prep` on the run's spec (spec/resolved.yaml)")
    model = run.load_model()
    return explain_and_log(run, model, prepared, spec, {"run_id": run_id})
