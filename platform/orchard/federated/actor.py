"""The Ray actor that runs a simulation's ClientApp: Flower's ``ClientAppActor``, without Flower's package.

Flower defines its actor in ``flwr.simulation.ray_transport.ray_actor``, so a Ray worker that hosts one
imports ``flwr.simulation`` first, and with it what ``run_simulation`` needs in the driver: the SuperLink's
SQL state (SQLAlchemy, Alembic and their schema models), FastAPI, Starlette. 41 MiB of RSS per actor process
here that a ClientApp never uses, in every actor of every simulation. ``ClientAppActor`` below does what
Flower's does (``run``: load the app, hand it the message, re-raise its errors as ``ClientAppException``;
``terminate``) and imports only ``flwr.app`` and ``flwr.clientapp``. Inside ``own_actors()`` Flower's Ray
backend builds its actor pool from it; everything else about the pool (sizing, submission, resources) is
Flower's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError


@ray.remote
class ClientAppActor:
    """One simulated SuperNode's worker process: runs ClientApp calls one at a time."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn:
            on_actor_init_fn()

    def run(self, client_app_fn: Callable[[], ClientApp], message: Message, cid: str,
            context: Context) -> tuple[str, Message, Context]:
        try:
            app = client_app_fn()
            out_message = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:  # noqa: BLE001 - as Flower's actor: the engine reads ClientAppException
            raise ClientAppException(str(ex)) from ex
        return cid, out_message, context

    def terminate(self) -> None:
        ray.actor.exit_actor()


@contextlib.contextmanager
def own_actors() -> Iterator[None]:
    """Flower's Ray backend builds its actor pool from ``ClientAppActor`` (this module's) while inside."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original: Any = raybackend.ClientAppActor
    raybackend.ClientAppActor = ClientAppActor
    try:
        yield
    finally:
        raybackend.ClientAppActor = original
