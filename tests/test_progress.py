"""The progress file is replaced whole: a reader polling it while an engine rewrites it never sees half a JSON."""

from __future__ import annotations

import threading

from orchard.progress import FILE_NAME, progress_file, read_progress, write_progress

PAD = 200_000  # large enough that a plain write_text is observed half-written by a concurrent reader


def test_a_reader_never_sees_a_half_written_progress_file(tmp_path):
    path = progress_file(tmp_path / "run")
    assert path.name == FILE_NAME
    stop = threading.Event()
    written = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            write_progress(path, {"round": n, "pad": str(n % 10) * PAD})
            written.append(n)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen, reads = [], 0
        while len(written) < 200 or reads < 2000:
            reads += 1
            existed = bool(written)  # taken BEFORE the read: the first write may finish during it
            state = read_progress(path)
            if state is None:
                assert not existed, "the file existed but could not be read whole"
                continue
            assert state["pad"] == str(state["round"] % 10) * PAD
            seen.append(state["round"])
    finally:
        stop.set()
        thread.join()
    assert len(set(seen)) > 1, "the reader never overlapped the writer: the test proves nothing"
    assert seen == sorted(seen)  # always the latest whole state or the one before it, never older
    assert [p.name for p in path.parent.iterdir()] == [FILE_NAME]  # no temporary files left behind


def test_reading_a_missing_or_foreign_progress_file_gives_none(tmp_path):
    assert read_progress(tmp_path / FILE_NAME) is None
    (tmp_path / FILE_NAME).write_text('{"round": 3, "fed/acc')
    assert read_progress(tmp_path / FILE_NAME) is None
    write_progress(tmp_path / FILE_NAME, {"epoch": 2, "val/loss": 0.5})
    assert read_progress(tmp_path / FILE_NAME) == {"epoch": 2, "val/loss": 0.5}
