"""The simulation's message extractor: the same deliveries as Flower's, in one pass over pending messages.

Real Flower parts: an ``InMemoryLinkState`` as ``run_simulation`` builds it, nodes registered by Flower's
own ``_register_nodes``, messages stored with ``store_message_ins``; Flower's extractor and ours each poll
an identically filled state once.
"""

from __future__ import annotations

import threading
import time
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager

from orchard.federated import dispatch

NODES = 6


class OnePoll(threading.Event):
    """A stop event that ends an extractor loop after exactly one poll."""

    def wait(self, timeout=None) -> bool:
        self.set()
        return True


def _state():
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    mapping = vce_api._register_nodes(NODES, factory)
    return state, list(mapping), mapping


def _store(state, node: int, tag: str, ttl: float = 3600.0) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # The ServerApp's identity, as run_simulation sets it (``server_identity`` restores it).
    TaskIdentity.run_id, TaskIdentity.node_id = next(iter(state.run_ids)), SUPERLINK_NODE_ID
    msg = Message(RecordDict({"c": ConfigRecord({"tag": tag})}), dst_node_id=node, message_type="train", ttl=ttl)
    msg.metadata.__dict__["_message_id"] = f"id-{tag}"
    assert state.store_message_ins(msg) is not None


def _fill(state, nodes: list[int]) -> None:
    """Stored in an order unlike the nodes': two for node 3, one that expires, none for nodes 0 and 5."""
    _store(state, nodes[3], "n3-first")
    _store(state, nodes[1], "n1")
    _store(state, nodes[3], "n3-second")
    _store(state, nodes[4], "n4-expiring", ttl=0.2)
    _store(state, nodes[2], "n2")


def _poll(extractor, state, mapping) -> list[str]:
    queue: Queue = Queue()
    extractor(state, queue, mapping, OnePoll())
    return [queue.get_nowait().content["c"]["tag"] for _ in range(queue.qsize())]


def test_one_poll_delivers_what_flowers_poll_delivers(server_identity):
    ours, flowers = _state(), _state()
    for state, nodes, _ in (ours, flowers):
        _fill(state, nodes)
    time.sleep(0.3)  # the ttl=0.2 message expires
    for _ in range(3):  # the second poll delivers node 3's second message; the third finds nothing left
        got = _poll(dispatch.add_messages_to_queue, ours[0], ours[2])
        assert got == _poll(vce_api.add_messages_to_queue, flowers[0], flowers[2])
    states = [s for s, _, _ in (ours, flowers)]
    # Delivered messages stay stored (marked) until their replies are pulled; the expired one is deleted by both.
    assert [sorted(s.message_ins_store) for s in states] == [sorted(states[1].message_ins_store)] * 2
    assert "id-n4-expiring" not in states[0].message_ins_store


def test_order_one_per_node_and_marking(server_identity):
    state, nodes, mapping = _state()
    _fill(state, nodes)
    time.sleep(0.3)
    first = dispatch.take_pending(state, mapping)
    # Node registration order, at most one per node, the expired message neither delivered nor kept.
    assert [m.content["c"]["tag"] for m in first] == ["n1", "n2", "n3-first"]
    assert all(m.metadata.delivered_at for m in first)
    assert [m.content["c"]["tag"] for m in dispatch.take_pending(state, mapping)] == ["n3-second"]
    assert dispatch.take_pending(state, mapping) == []
    # A node outside the mapping is not this engine's: its message waits.
    _store(state, nodes[5], "n5")
    assert dispatch.take_pending(state, {n: i for n, i in mapping.items() if n != nodes[5]}) == []


def test_fast_dispatch_swaps_flowers_extractor_and_restores_it(server_identity):
    original = vce_api.add_messages_to_queue
    with dispatch.fast_dispatch():
        inside = vce_api.add_messages_to_queue
        assert inside is not original and inside.__wrapped__ is original
        with dispatch.fast_dispatch():  # nested: left as it is
            assert vce_api.add_messages_to_queue is inside
        state, nodes, mapping = _state()
        _store(state, nodes[0], "n0")
        assert _poll(inside, state, mapping) == ["n0"]
    assert vce_api.add_messages_to_queue is original


def test_another_state_gets_flowers_own_poll():
    calls = []

    def flowers(state, queue, mapping, f_stop):
        calls.append(state)

    other = object()
    dispatch.add_messages_to_queue(other, Queue(), {}, OnePoll(), _flower=flowers)
    assert calls == [other]
    with pytest.raises(AttributeError):
        dispatch.take_pending(other, {})
