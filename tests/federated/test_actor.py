"""Orchard's ClientApp actor (``orchard.federated.actor``) in Flower's own Ray backend: the pool Flower builds
inside ``own_actors()`` runs ClientApp calls as Flower's actor does, in a worker that never imports
``flwr.simulation`` (SQLAlchemy, Alembic, FastAPI come with it)."""
from __future__ import annotations

import pytest

_HEAVY = ("flwr.simulation", "sqlalchemy", "alembic", "fastapi")


def _app():
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        import sys

        if msg.content["config"]["fail"]:
            raise ValueError("client asked to fail")
        loaded = ",".join(m for m in _HEAVY if m in sys.modules) or "-"
        return Message(RecordDict({"out": ConfigRecord({"loaded": loaded, "node": context.node_id})}), reply_to=msg)

    return app


@pytest.mark.slow
@pytest.mark.usefixtures("server_identity")
def test_flowers_ray_backend_runs_clientapps_in_orchards_lean_actor():
    import ray
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp.client_app import ClientAppException
    from flwr.common import MessageType
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from orchard.federated.actor import ClientAppActor, own_actors
    from orchard.raystart import start_ray

    flowers = raybackend.ClientAppActor
    assert start_ray(2, lean=True)
    try:
        backend = raybackend.RayBackend({"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        app = _app()
        with own_actors():
            assert raybackend.ClientAppActor is ClientAppActor
            backend.build(lambda: app)
        assert raybackend.ClientAppActor is flowers  # Flower's again once built
        assert backend.pool.num_actors == 2

        def send(node, fail):
            msg = Message(RecordDict({"config": ConfigRecord({"fail": fail})}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": node}, state=RecordDict(),
                          run_config={})
            return backend.process_message(msg, ctx)[0]

        replies = [send(node, False) for node in range(4)]
        assert [r.content["out"]["node"] for r in replies] == [0, 1, 2, 3]
        assert {r.content["out"]["loaded"] for r in replies} == {"-"}, [r.content["out"]["loaded"] for r in replies]
        with pytest.raises(ClientAppException, match="client asked to fail"):
            send(5, True)
        assert send(6, False).content["out"]["node"] == 6  # the pool goes on after a failed call
        backend.terminate()  # Flower's: ends the actors and shuts Ray down
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
