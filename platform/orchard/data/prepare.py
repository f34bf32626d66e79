"""``prepare``: spec in, prepared folder out — or the existing folder when nothing changed.

Resolving the source, checking columns and recognising an unchanged prep happen here without
Spark; only a prep that has to run imports pyspark (``orchard.data.pipeline``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from orchard.config import JobSpec
from orchard.data.groups import keyed, partition_column, with_group
from orchard.data.manifest import MANIFEST, PreparedData, load_manifest, prepared_folder, verify
from orchard.data.source import Source, content_hash, image_shape, resolve

log = logging.getLogger("orchard.data")


def prepare(spec: JobSpec, log_path: Path | None = None) -> PreparedData:
    """Prepare ``spec.data`` into ``<data.output>/<dataset>-<content_hash>/`` (see manifest.py).

    Raises ``orchard.config.SpecError`` (naming the file, column or key) before any compute for a
    missing source, label, feature or partition column, and after reading for fewer than two classes.
    With ``log_path``, Spark's own output goes to that file instead of the terminal.

    An existing folder is reused only if its files still match its manifest (``manifest.verify``);
    otherwise it is moved aside and prepared again at the same path. Two preps of the same data
    never both write: the second waits on ``<folder>.lock`` and then reuses the first one's folder.
    """
    source, shape, digest, group = plan(spec)
    target = prepared_folder(spec.data.output, source.slug, digest)
    if (reused := _reusable(target)) is not None:
        log.info("reusing prepared data %s", target)
        return reused

    from orchard.data.write import discard, exclusive, sweep

    with exclusive(target):
        if (reused := _reusable(target, warn=True)) is not None:
            log.info("reusing prepared data %s, prepared meanwhile by another process", target)
            return reused
        if target.exists():
            discard(target)
        sweep(target)
        return _prepare(spec, log_path, source, shape, digest, group, target)


def _reusable(target: Path, warn: bool = False) -> PreparedData | None:
    """The folder at ``target`` if its manifest reads and its files match it, else None."""
    if not (target / MANIFEST).is_file():
        if warn and target.exists():
            log.warning("prepared data %s has no manifest.json (an unfinished or foreign folder)", target)
        return None
    try:
        prepared = load_manifest(target)
        problems = verify(prepared)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a manifest that does not parse or files vanishing
        prepared, problems = None, [f"unreadable manifest.json or files ({e!r})"]
    if problems and warn:
        log.warning("prepared data %s does not match its manifest: %s", target, "; ".join(problems))
    return None if problems else prepared


def _prepare(spec: JobSpec, log_path: Path | None, source: Source, shape, digest: str, group: str | None,
             target: Path) -> PreparedData:
    from orchard.data import pipeline
    from orchard.data.session import spark_for
    from orchard.data.write import file_records, publish, staging, write_manifest

    data = spec.data
    started = time.perf_counter()
    log.info("preparing %s -> %s", source.describe(), target)
    with spark_for(data.spark, log_path) as spark, staging(target) as tmp:
        manifest = pipeline.run(spark, source, data, tmp, shape=shape, digest=digest, group=group)
        manifest["files"] = file_records(tmp)
        write_manifest(tmp, manifest)
        if not publish(tmp, target):
            log.info("an identical prep finished first; using %s", target)
            return load_manifest(target)
    counts = manifest["counts"]
    log.info("prepared %s in %.1f s: %s", target, time.perf_counter() - started, counts)
    if counts["quarantined"]:
        log.warning(
            "%d of %d rows quarantined, see %s", counts["quarantined"], counts["input"], target / "quarantine"
        )
    return PreparedData(path=target, manifest=manifest, reused=False)


def prepared_path(spec: JobSpec) -> Path:
    """The folder ``prepare(spec)`` writes or reuses, found without Spark and without preparing."""
    source, _, digest, _ = plan(spec)
    return prepared_folder(spec.data.output, source.slug, digest)


def plan(spec: JobSpec) -> tuple[Source, list[int] | None, str, str | None]:
    """(source, image shape, content hash, partition column), checked without Spark."""
    data = spec.data
    source = resolve(data)
    group = partition_column(spec)
    if group is not None:
        source = with_group(source, data, group)
    return source, image_shape(source, data), keyed(content_hash(source, data), group), group
