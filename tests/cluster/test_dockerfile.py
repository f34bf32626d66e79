"""cluster/Dockerfile and .dockerignore, checked without a Docker daemon.

The build context is computed with docker-py's own .dockerignore matcher (the `docker` package is in the
pinned stack), so these tests see the files `docker build` would send.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def _context() -> set[str]:
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return set(exclude_paths(str(ROOT), patterns, dockerfile="cluster/Dockerfile"))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1] if " " in x else "") for x in lines]


def test_build_context_has_what_the_image_copies_and_no_local_state():
    context = _context()
    for kind, args in _instructions():
        if kind == "COPY":
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for src in sources:
                src = src.rstrip("/")
                assert src in context or any(f.startswith(src + "/") for f in context), f"COPY {src}"
    assert "platform/orchard/cli.py" in context and "jobs/digits-cnn.yaml" in context
    leaked = [f for f in context if re.match(r"(\.venv|\.git|\.orchard|mlruns|\.whl)(/|$)|(.*/)?mlflow\.db$", f)
              or f.endswith((".whl", ".env"))]
    assert leaked == []


def test_secrets_file_for_ray_up_is_kept_out_of_the_image(tmp_path):
    secret = ROOT / "cluster" / "orchard.env"
    existed = secret.exists()
    if not existed:
        secret.write_text("RAY_AUTH_TOKEN=not-a-real-token\n")
    try:
        assert "cluster/orchard.env" not in _context()
    finally:
        if not existed:
            secret.unlink()


def test_image_installs_with_the_makefiles_single_pinned_resolver_call():
    installs = [args for kind, args in _instructions() if kind == "RUN" and "-e ." in args]
    assert len(installs) == 1
    make = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "-c constraints.txt" in x)
    assert "-c constraints.txt" in installs[0] and "-c constraints.txt" in make
    assert "-e ." in installs[0] and "-e '.[dev]'" in make  # the same project, without the dev extras
    # The image must not depend on a GPU at build time: the torch index is an explicit build argument.
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


def test_every_stage_runs_as_the_non_root_user():
    users: dict[str, str] = {}
    stage = None
    for kind, args in _instructions():
        if kind == "FROM":
            words = args.split()
            stage = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else words[0]
            users[stage] = users.get(words[0], "root")  # a stage built on another inherits its USER
        elif kind == "USER":
            users[stage] = args.strip()
    assert stage == "platform"  # the default target (last stage) is the platform image
    assert users == {"runtime": "orchard", "mlflow": "orchard", "platform": "orchard"}
