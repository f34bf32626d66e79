"""The ClientApp: one SuperNode trains the global model on its own partition with the shared loop.

Everything a client needs reaches it through the factory's closure (``run_simulation`` leaves
``context.run_config`` empty); the closure holds the spec, manifest and partition folder, never data.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from orchard.config import JobSpec
from orchard.engine import LoopOptions, build_optimizer, make_task, seed_everything, train_epoch
from orchard.federated.partitions import client_file, label_dtype, read_xy
from orchard.models import model_from_manifest

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"


def _partition(path: Path, manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return _cached_partition(str(path), path.stat().st_mtime_ns, int(manifest["feature_dim"]), label_dtype(manifest))


@functools.lru_cache(maxsize=8)
def _cached_partition(path: str, mtime_ns: int, feature_dim: int, labels_as: type
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's rows, kept per actor process: Ray reuses actors across rounds and clients."""
    x, y = read_xy([Path(path)], feature_dim, labels_as)
    return torch.from_numpy(x), torch.from_numpy(y)


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches, a new order each epoch; whole batches are sliced, not collated row by row."""
    order = RandomSampler(range(len(y)), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, y), batch_size=None,
                      sampler=BatchSampler(order, batch_size, drop_last=False))


def local_train(spec: JobSpec, manifest: dict, partitions: Path, msg: Message, context: Context) -> Message:
    """Load the global arrays, run ``local-epochs`` of the shared loop, reply with arrays and metrics."""
    client = int(context.node_config["partition-id"])
    config = msg.content[CONFIG_KEY]
    server_round = int(config.get("server-round", 0))
    # Distinct but reproducible per client and round: equal seeds would give every client the same
    # dropout masks and batch order.
    seed = spec.train.seed + 100_003 * server_round + client
    seed_everything(seed)
    torch.set_num_threads(max(1, int(spec.federated.client_cpus)))

    x, y = _partition(client_file(partitions, client), manifest)
    device = torch.device("cpu")
    task = make_task(manifest, spec.train, manifest.get("class_counts"))
    model = model_from_manifest(spec.model, manifest, spec.data.sequence_shape, spec.train.loss)
    model.load_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict())
    optimizer = build_optimizer(model, spec.train.model_copy(update={"lr": float(config["lr"])}), device)
    # No optimizer given, so no LR schedule: a schedule over a few local steps would restart every round.
    opts = LoopOptions.from_spec(spec.train, device)
    loader = _loader(x, y, spec.train.batch_size, seed)
    losses = [train_epoch(model, loader, optimizer, device, task, opts).loss
              for _ in range(int(config["local-epochs"]))]
    metrics = MetricRecord({"train_loss": sum(losses) / len(losses), "num-examples": int(len(y))})
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def make_client_app(spec: JobSpec, manifest: dict, partitions: Path) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return local_train(spec, manifest, partitions, msg, context)

    return app
