"""Fixtures shared by the federated tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def server_identity():
    """What a ServerApp process has set before it builds messages (tests that build them in-process)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
