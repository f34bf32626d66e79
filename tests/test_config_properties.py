"""Hostile specs: whatever the file or ``--set`` holds, the answer is a spec or a SpecError naming where.

Hypothesis generates YAML documents (schema-shaped and not), raw text that may not be YAML at all,
non-mapping top levels and ``--set`` strings. The profile is derandomized with a bounded example
count, so CI runs the same examples every time.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from orchard.config import JobSpec, SpecError, load_spec, spec_yaml

ROOT = Path(__file__).resolve().parents[1]
CI = settings(derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _schema_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, field in model.model_fields.items():
        out.append((*prefix, name))
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _schema_paths(ann, (*prefix, name))
    return out


PATHS = _schema_paths(JobSpec) + [("train", "early_stopping", "metric"), ("train", "early_stopping", "patience")]
KEYS = sorted({p[-1] for p in PATHS} | {"learning_rate", "num_clients", "arch"})

keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(-3, 3), st.booleans(), st.none())
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-5, 100), st.floats(),
    st.text(max_size=16), st.sampled_from(["train", "federated", "mlp", "cnn", "fedavg", "auto", "val/loss",
                                           "sklearn:digits", "none", "local", "central_fixed", "natural"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
DEFAULTS = JobSpec(name="p", kind="train").flat()


def _near(default):
    """Values a user could plausibly write for a field: its default, a neighbour, or the wrong type."""
    options = [default, str(default), None]
    if isinstance(default, bool):
        options += [not default, "yes", 1]
    elif isinstance(default, int | float):
        options += [default + 1, default * 2, -default, 0, 0.5, default - 1]
    elif isinstance(default, list):
        options += [default[:1], [], [*default, 3]]
    return st.sampled_from(options)


def _nest(flat: dict[str, object], head: dict) -> dict:
    doc = dict(head)
    for dotted, value in flat.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[leaf] = value
    return doc


# Mostly valid specs with a few fields moved: this is where the cross-field validators live.
near_valid = st.builds(
    _nest,
    st.dictionaries(st.sampled_from(sorted(DEFAULTS)), st.just(None), max_size=4).flatmap(
        lambda picked: st.fixed_dictionaries({k: st.one_of(st.just(DEFAULTS[k]), _near(DEFAULTS[k]), scalars) for k in picked})),
    st.fixed_dictionaries({"name": st.just("p") | scalars, "kind": st.sampled_from(["train", "federated"])}),
)
sections = st.fixed_dictionaries(
    {}, optional={s: st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=5)
                  for s in ("data", "model", "train", "scaling", "federated", "tracking")})
schema_shaped = st.builds(
    lambda head, body: {**head, **body},
    st.fixed_dictionaries({}, optional={"name": scalars, "kind": st.sampled_from(["train", "federated", "tune"])
                                        | scalars}),
    sections,
)
YAMLISH = [":", ": ", "- ", "\n", "  ", "{", "}", "[", "]", ",", "!!", "!!int ", "!!float ", "!!binary ",
           "!!timestamp ", "!!python/object:os.system ", "&a ", "*a", "*b", "? ", "|", ">", "#", "'", '"',
           "%YAML 1.1\n", "---\n", "...\n", "name", "kind", "train", "epochs", "2020-13-45", "1e999", ".nan",
           "9" * 5000, "\t", "\x00", "\ufeff", "é"]
yamlish_text = st.lists(st.sampled_from(YAMLISH) | st.text(max_size=4), max_size=24).map("".join)
near_valid_yaml = near_valid.map(lambda d: yaml.safe_dump(d, allow_unicode=True))
documents = st.one_of(
    near_valid_yaml, near_valid_yaml, near_valid_yaml,
    schema_shaped.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    values.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),  # any top level, mapping or not
    yamlish_text,
    st.text(max_size=200),
).map(str.encode) | st.binary(max_size=64)  # and bytes that need not be UTF-8 at all

override_keys = st.one_of(st.sampled_from([".".join(p) for p in PATHS]), st.text(max_size=12),
                          st.sampled_from(["", ".", "train..epochs", "name.x", "train.epochs.x", " = "]))
override_values = st.one_of(st.text(max_size=12), yamlish_text,
                            values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))
overrides = st.just([]) | st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), st.text(max_size=16)),
    max_size=3,
)

BASE = yaml.safe_dump({"name": "p", "kind": "train"}).encode()


def _check_load(path: Path, sets: list[str]) -> None:
    try:
        spec = load_spec(path, sets)
    except SpecError as exc:
        msg = str(exc)
        event("spec error: " + ("--set" if "--set" in msg else msg.split(": ", 2)[1][:20]))
        assert str(path) in msg or "--set" in msg, msg
        return
    assert isinstance(spec, JobSpec)
    event("valid spec")
    # A spec that loads is one that every consumer can hash, flatten and print back.
    assert all(not isinstance(v, float) or math.isfinite(v) for v in spec.flat().values()), spec.flat()
    assert len(spec.digest()) == 16
    again = path.with_name("again.yaml")
    again.write_text(spec_yaml(spec))
    assert load_spec(again) == spec


@settings(CI, max_examples=300)
@given(doc=documents, sets=overrides)
@example(doc=b"name: x\nkind: train\ntrain: {epochs: 2020-13-45}\n", sets=[])  # ValueError from the timestamp tag
@example(doc=b"name: x\nkind: train\nseed: " + b"9" * 5000 + b"\n", sets=[])  # int over Python's 4300 digits
@example(doc=b"[" * 3000 + b"]" * 3000, sets=[])  # RecursionError while composing
@example(doc=b"a: !!float abc\n", sets=[])
@example(doc=b"a: !!timestamp 2020-1-1x\n", sets=[])  # AttributeError inside PyYAML
@example(doc=b"!!int", sets=[])  # IndexError inside PyYAML
@example(doc=b"name: \xff\xfe\n", sets=[])  # not UTF-8
@example(doc=b"&a {name: x, kind: train, data: *a}\n", sets=[])  # a mapping that contains itself
@example(doc=BASE, sets=["train.epochs=2020-13-45"])
@example(doc=BASE, sets=["train.epochs=" + "9" * 5000])
@example(doc=BASE, sets=["train.lr=.nan"])
@example(doc=BASE, sets=["federated.attack.scale=.inf"])
def test_any_spec_file_and_overrides_give_a_spec_or_a_spec_error(tmp_path_factory, doc, sets):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_bytes(doc)
    _check_load(path, sets)


# (spec bytes, --set values, exit code, a fragment the output must hold)
CLI_CASES = [
    (b"name: x\nkind: train\n", ["train.epochs=3"], 0, "epochs: 3"),
    (b"name: x\nkind: train\n'[/oops]': 1\n", [], 2, "[/oops]: unknown key"),  # rich markup in a user's key
    (b"name: x\nkind: train\n", ["[/bold]=1"], 2, "[/bold]: unknown key"),
    (b"name: x\nkind: train\ntrain: {epochs: 2020-13-45}\n", [], 2, "not valid YAML"),
    (b"\xff\xfe\x00", [], 2, "not valid YAML"),
    (b"[" * 3000, [], 2, "not valid YAML"),
    (b"- 1\n- 2\n", [], 2, "a spec is a mapping"),
    (b"name: x\nkind: train\n", ["model.family=[/x]"], 2, "model.family"),
    (b"name: x\nkind: train\n", ["train.epochs=" + "9" * 5000], 2, "--set train.epochs"),
    (b"name: x\nkind: train\n", ["train.lr=.inf"], 2, "train.lr"),
]


def test_the_cli_answers_hostile_specs_with_exit_2_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for i, (doc, sets, code, fragment) in enumerate(CLI_CASES):
        path = tmp_path / f"spec{i}.yaml"
        path.write_bytes(doc)
        cmd = [sys.executable, "-m", "orchard.cli", "check", str(path), *[a for s in sets for a in ("--set", s)]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        seen = (doc[:60], sets, done.stdout[-1500:], done.stderr[-1500:])
        assert "Traceback" not in done.stderr + done.stdout, seen
        assert done.returncode == code, seen
        assert fragment in " ".join(done.stdout.split()), seen
        if code == 2:
            assert "error:" in done.stdout, seen
