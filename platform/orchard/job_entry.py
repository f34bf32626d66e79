"""The first thing a Ray job runs: check the interpreter has Orchard's stack, then hand over to ``orchard``.

Standard library only: on a Python without Orchard's packages, a plain ``python -m orchard.cli`` dies on
its first import (``No module named 'rich'``) with no hint that the job picked the wrong interpreter.
"""

from __future__ import annotations

import importlib.util
import sys

REQUIRED = ("orchard", "rich", "pydantic", "torch", "ray", "flwr", "mlflow", "pyspark")


def missing_modules() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def main(argv: list[str]) -> int:
    missing = missing_modules()
    if missing:
        print(f"orchard: this Ray job runs {sys.executable}, which lacks {', '.join(missing)}. The job's "
              "Python is the one that started the cluster's Ray workers (or `python` on the head's PATH if "
              "the cluster did not say): start `ray start` from the environment Orchard is installed in, "
              "or submit with --image.", file=sys.stderr)
        return 1
    from orchard.cli import main as orchard_main

    return orchard_main(argv)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if "orchard.cli" in sys.modules:  # the stack was there and the command ran: exit as `orchard` does
        sys.modules["orchard.cli"].quick_exit_prep()
    sys.exit(code)
