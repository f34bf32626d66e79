"""Which run `orchard run SPEC --resume` may continue, against a real (SQLite) MLflow store."""

import pytest

from orchard.config import JobSpec, SpecError
from orchard.runner import _resumable
from orchard.tracking import JobRun


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQLite store's artifacts go to ./mlruns


def _spec(tmp_path, epochs: int = 3) -> JobSpec:
    return JobSpec(name="resubmit", kind="train", train={"epochs": epochs},
                   tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def _run(spec: JobSpec, status: str) -> str:
    job = JobRun(spec)
    job.finish(status)
    return job.run_id


def test_resume_continues_only_the_newest_run_of_the_same_spec_while_it_is_unfinished(tmp_path):
    spec = _spec(tmp_path)
    failed = _run(spec, "FAILED")
    assert _resumable(spec) == failed
    _run(spec, "FINISHED")  # resubmitted without --resume and finished: the failed run is superseded
    with pytest.raises(SpecError, match="finished: nothing to resume"):
        _resumable(spec)


def test_resume_with_a_changed_spec_of_the_same_name_is_refused(tmp_path):
    first = _spec(tmp_path)
    unfinished = _run(first, "FAILED")
    changed = _spec(tmp_path, epochs=5)
    with pytest.raises(SpecError, match=f"unfinished run {unfinished} .* another spec .*{changed.digest()}"):
        _resumable(changed)
    assert _resumable(first) == unfinished  # the original spec still resumes it
