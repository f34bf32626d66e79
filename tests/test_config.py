"""Spec validation: bad specs are refused with the dotted key, before anything runs."""

from pathlib import Path

import pytest
import yaml

from orchard.config import JobSpec, SpecError, load_spec, validate_spec

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(job):
    spec = load_spec(job)
    assert spec.name and spec.kind in ("train", "federated", "tune")


def test_typo_names_the_dotted_key_and_suggests_the_nearest(tmp_path):
    p = _write(tmp_path, {"name": "x", "kind": "train", "train": {"epoch": 3}})
    with pytest.raises(SpecError) as exc:
        load_spec(p)
    msg = str(exc.value)
    assert "train.epoch: unknown key" in msg
    assert "did you mean 'train.epochs'" in msg
    assert str(p) in msg


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"modle: unknown key \(did you mean 'model'"):
        load_spec(_write(tmp_path, {"name": "x", "kind": "train", "modle": {}}))


@pytest.mark.parametrize("patch, key", [
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"model": {"family": "resnet"}}, "model.family"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
    ({"data": {"split": {"train": 0.9, "val": 0.2, "test": 0.1}}}, "data.split"),
    ({"kind": "serve"}, "kind"),
])
def test_wrong_type_or_range_names_the_key(patch, key):
    raw = {"name": "x", "kind": "train", **patch}
    with pytest.raises(SpecError) as exc:
        validate_spec(raw)
    assert f"\n  {key}" in str(exc.value)


def test_missing_name_is_reported():
    with pytest.raises(SpecError, match="name: required field is missing"):
        validate_spec({"kind": "train"})


def test_overrides_go_through_validation(tmp_path):
    p = _write(tmp_path, {"name": "x", "kind": "train"})
    spec = load_spec(p, ["train.epochs=3", "model.hidden=[32, 16]", "scaling.use_gpu=false"])
    assert spec.train.epochs == 3 and spec.model.hidden == [32, 16] and spec.scaling.use_gpu is False
    with pytest.raises(SpecError, match="train.epochz: unknown key"):
        load_spec(p, ["train.epochz=3"])
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(p, ["train.epochs"])


def test_spec_hash_is_stable_and_sensitive():
    a = JobSpec(name="x", kind="train")
    b = JobSpec(name="x", kind="train")
    assert a.digest() == b.digest()
    b.train.epochs = 99
    assert a.digest() != b.digest()
    assert a.flat()["train.epochs"] == 10


def test_names_from_other_tools_suggest_ours():
    with pytest.raises(SpecError, match=r"train.learning_rate: unknown key \(did you mean 'train.lr'\?\)"):
        validate_spec({"name": "x", "kind": "train", "train": {"learning_rate": 0.1}})


def test_fsdp_is_accepted_on_cpus():
    # FSDP2 runs over gloo on CPUs (tests/train/test_fsdp.py trains with it).
    spec = validate_spec({"name": "x", "kind": "train", "scaling": {"strategy": "fsdp", "use_gpu": False}})
    assert spec.scaling.strategy == "fsdp"
