"""A real ``mlflow server`` process for tracking tests, started with the stack's own argv.

The backend is a fresh PostgreSQL database when ``ORCHARD_TEST_PG_URI`` is set (what the deployed stack
runs), else SQLite in the test's temp folder. ``stop()`` and ``start()`` again keep port and backend, so
a test can take the server away in the middle of a job and bring the same one back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from orchard.remote.services import MLFLOW_SERVER_ENV, mlflow_server
from tests.net import free_port, stop_group


class MlflowServer:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._pg_db: str | None = None
        self.backend = self._backend()
        self.log_path = tmp / "mlflow-server.log"

    def _backend(self) -> str:
        pg = os.environ.get("ORCHARD_TEST_PG_URI")
        if not pg:
            return f"sqlite:///{self.tmp / 'mlflow-server.db'}"
        self._pg_db = f"orchard_test_{uuid.uuid4().hex[:10]}"
        self._pg_admin(f"CREATE DATABASE {self._pg_db}")
        # SQLAlchemy maps a bare postgresql:// to psycopg 3; the stack installs psycopg2.
        base = pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
        return f"{base}/{self._pg_db}"

    def _pg_admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(os.environ["ORCHARD_TEST_PG_URI"])
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def start(self, timeout_s: float = 300.0) -> None:  # minutes on a busy 2-core box (two test workers)
        argv = mlflow_server(self.backend, str(self.tmp / "mlflow-artifacts"), port=self.port)
        argv[0] = str(Path(sys.executable).with_name("mlflow"))
        # Own session: the server forks workers, and the whole group must go to free the port.
        self.proc = subprocess.Popen(argv, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **MLFLOW_SERVER_ENV})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server not up after {timeout_s} s: {self.log_path.read_text()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc)
        deadline = time.monotonic() + 30
        while self.healthy() and time.monotonic() < deadline:  # a straggling worker may hold the port
            time.sleep(0.2)

    def close(self) -> None:
        self.stop()
        if self._pg_db:
            self._pg_admin(f"DROP DATABASE IF EXISTS {self._pg_db} WITH (FORCE)")
