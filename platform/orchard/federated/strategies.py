"""The strategy factory: any of Flower's 12 Message-API strategies from ``federated.strategy``.

Orchard's own behaviour (reply validation, participation records, round skipping, round offsets for
resume) lives in ``GuardedStrategy``, a thin wrapper put *outside* every strategy and outside Flower's DP
wrappers: those skip a round on any error reply and clip before calling the strategy they wrap, so replies
must be filtered before they reach them. One wrapper serves all 12 strategies (DESIGN rule 5).
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from orchard.config import JobSpec, SpecError

logger = logging.getLogger("flwr")  # the engine log (simulation.engine_logs_to) collects this logger


def num_sampled(spec: JobSpec) -> int:
    """Clients asked per round, as ``FedAvg.configure_train`` computes it."""
    fed = spec.federated
    return max(int(fed.clients * fed.fraction_train), fed.min_train_clients)


def num_malicious(spec: JobSpec) -> int:
    """Attackers a robust rule must tolerate: explicit, or the attack fraction of the sampled clients."""
    f = spec.federated.strategy.num_malicious
    if f == "auto":
        return round(spec.federated.attack.fraction * num_sampled(spec))
    return int(f)


def check_strategy(spec: JobSpec) -> None:
    """Refuse combinations a strategy cannot aggregate, before any process starts."""
    fed, name = spec.federated, spec.federated.strategy.name
    n, f = num_sampled(spec), num_malicious(spec)
    where = f"federated.strategy.name={name}"
    # Conditions from flwr.serverapp.strategy: Bulyan skips rounds with fewer than 4f+3 replies; Krum's
    # score sums the n-f-2 nearest updates, meaningful only for n > 2f+2 (Blanchard et al.).
    if name == "bulyan" and n < 4 * f + 3:
        raise SpecError(f"{where}: Bulyan needs at least 4*num_malicious+3 = {4 * f + 3} clients per round, "
                        f"but {n} are sampled (clients x fraction_train); every round would be skipped")
    if name in ("krum", "multikrum") and n <= 2 * f + 2:
        raise SpecError(f"{where}: Krum needs more than 2*num_malicious+2 = {2 * f + 2} clients per round, "
                        f"but {n} are sampled (num_malicious={f})")
    if name == "multikrum" and fed.strategy.num_selected > n - f:
        raise SpecError(f"{where}: num_selected={fed.strategy.num_selected} exceeds the {n - f} honest "
                        f"clients per round (sampled {n} - num_malicious {f})")
    if name == "fedtrimmedavg" and int(fed.strategy.trim_beta * n) * 2 >= n:
        raise SpecError(f"{where}: trim_beta={fed.strategy.trim_beta} trims every one of {n} replies")
    if fed.min_train_clients > n:
        raise SpecError(f"federated.min_train_clients={fed.min_train_clients} exceeds the {n} clients "
                        "sampled per round: every round would be skipped")


def client_lr(spec: JobSpec) -> float:
    return spec.federated.client_lr or spec.train.lr


def build_strategy(spec: JobSpec) -> Any:
    """The Flower strategy named by the spec; clients evaluate only with ``federated.client_eval``."""
    from flwr.serverapp import strategy as st

    check_strategy(spec)
    fed, s = spec.federated, spec.federated.strategy
    common = {"fraction_train": fed.fraction_train, "fraction_evaluate": fed.client_eval or 0.0,
              "min_train_nodes": fed.min_train_clients, "min_evaluate_nodes": 1 if fed.client_eval else 0,
              "min_available_nodes": fed.min_available_clients or fed.clients}
    eta_l = client_lr(spec)
    adaptive = {"eta": s.server_lr, "eta_l": eta_l, "tau": s.tau}
    moments = {"beta_1": s.beta_1, "beta_2": s.beta_2}
    f = num_malicious(spec)
    factories = {
        "fedavg": lambda: st.FedAvg(**common),
        "fedavgm": lambda: st.FedAvgM(**common, server_learning_rate=s.server_lr,
                                      server_momentum=s.server_momentum),
        "fedprox": lambda: st.FedProx(**common, proximal_mu=s.proximal_mu),
        "fedadagrad": lambda: st.FedAdagrad(**common, **adaptive),
        "fedadam": lambda: st.FedAdam(**common, **adaptive, **moments),
        "fedyogi": lambda: st.FedYogi(**common, **adaptive, **moments),
        "qfedavg": lambda: st.QFedAvg(**common, client_learning_rate=eta_l, q=s.q),
        "fedmedian": lambda: st.FedMedian(**common),
        "fedtrimmedavg": lambda: st.FedTrimmedAvg(**common, beta=s.trim_beta),
        "krum": lambda: st.Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: st.MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=s.num_selected),
        "bulyan": lambda: st.Bulyan(**common, num_malicious_nodes=f),
    }
    return factories[s.name]()


ARRAYS_KEY, METRICS_KEY, CLIENT_KEY = "arrays", "metrics", "orchard"
METRIC_KEYS = frozenset({"train_loss", "num-examples"})


@dataclass
class RoundLog:
    """One round as the server saw it: counts for ``fed/*`` and one row per sampled client."""

    sampled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    failed: int = 0
    rejected: int = 0
    capped: int = 0  # replies whose num-examples exceeded their node's partition size (kept, weight capped)
    skipped: bool = False
    clients: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        ok = [c for c in self.clients if c["status"] == "ok"]
        losses = [c["train_loss"] for c in ok]
        return {"fed/clients": float(len(ok)), "fed/failed": float(self.failed),
                "fed/rejected": float(self.rejected),
                "fed/capped": float(self.capped), "fed/skipped": float(self.skipped),
                "fed/bytes_sent": float(self.bytes_sent), "fed/bytes_received": float(self.bytes_received),
                "fed/client_train_loss": sum(losses) / len(losses) if losses else float("nan")}


def record_bytes(record: Any) -> int:
    return sum(len(a.data) for a in record.values())


class ReplyCheck:
    """What a valid train reply holds: the global model's keys, shapes and dtypes; finite values; a
    positive ``num-examples`` and a finite ``train_loss``. ``weight`` then caps ``num-examples``.

    The cap is keyed on the node that sent the reply, ``msg.metadata.src_node_id``: Flower sets it, not the
    client (the SuperLink stores a reply only from the node its instruction went to, authenticated by its
    key when SuperNode auth is on; in simulation the engine sets it). Nothing inside the reply, such as the
    ``client-id`` a ClientApp writes, can move a node's cap once it is bound.

    The server knows the partition sizes (it wrote the partitions) but not which node holds which
    partition: a SuperNode's ``partition-id`` is its own node config, which Flower never sends to the
    server. So each node is bound to one partition, one to one, on its first reply: to the partition its
    reply names if no other node holds that partition yet, else to none. From then on the node's weight is
    ``min(claimed, size of its bound partition)`` whatever later replies claim, and a node bound to none
    weighs at most the smallest partition. What that guarantees: no node ever weighs more than one
    partition, no partition's size is granted to two nodes, and a claim of 10**9 rows counts as at most the
    largest partition (one that forges the largest partition's id on its first reply gets that, and the
    honest holder of that partition then gets the smallest: the price of having no node-to-partition
    table; a deployment's operator could supply one, which this class would take as the binding).
    """

    def __init__(self, arrays: Any, partition_counts: list[int]) -> None:
        self.layout = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self.counts = partition_counts
        self.node_partition: dict[int, int | None] = {}  # node id -> bound partition (None: none free)
        self.partition_node: dict[int, int] = {}

    def claimed_client(self, msg: Any) -> int | None:
        """The client id the reply names: a hint for the first binding only, never trusted for the cap."""
        if msg.has_error() or CLIENT_KEY not in msg.content.config_records:
            return None
        cid = msg.content.config_records[CLIENT_KEY].get("client-id")
        return int(cid) if isinstance(cid, int) and 0 <= cid < len(self.counts) else None

    def client_of(self, msg: Any) -> int | None:
        """The partition bound to the reply's node (binding it on its first reply)."""
        node = msg.metadata.src_node_id
        if node not in self.node_partition:
            cid = self.claimed_client(msg)
            if cid is not None and cid not in self.partition_node:
                self.node_partition[node], self.partition_node[cid] = cid, node
            else:
                self.node_partition[node] = None
                if cid is not None:
                    logger.warning("node %d names client %d, already bound to node %d: its weight is capped at "
                                   "the smallest partition (%d rows)", node, cid, self.partition_node[cid],
                                   min(self.counts))
        return self.node_partition[node]

    def cap(self, msg: Any) -> int:
        """The most rows the reply's node may claim: its bound partition's size, else the smallest one."""
        cid = self.client_of(msg)
        return int(self.counts[cid] if cid is not None else min(self.counts))

    def problem(self, msg: Any) -> str | None:
        """Why ``msg`` cannot be aggregated, or None."""
        content = msg.content
        if list(content.array_records) != [ARRAYS_KEY] or list(content.metric_records) != [METRICS_KEY]:
            return (f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord '{METRICS_KEY}', got "
                    f"{list(content.array_records)} / {list(content.metric_records)}")
        arrays, metrics = content[ARRAYS_KEY], content[METRICS_KEY]
        if set(arrays) != set(self.layout):
            return f"array keys differ: missing {sorted(set(self.layout) - set(arrays))[:3]}, " \
                   f"extra {sorted(set(arrays) - set(self.layout))[:3]}"
        for key, (shape, dtype) in self.layout.items():
            a = arrays[key]
            if (tuple(a.shape), a.dtype) != (shape, dtype):
                return f"array {key}: shape {tuple(a.shape)} dtype {a.dtype}, expected {shape} {dtype}"
            values = a.numpy()
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"array {key}: NaN or Inf values"
        if set(metrics) != METRIC_KEYS:
            return f"metric keys {sorted(metrics)}, expected {sorted(METRIC_KEYS)}"
        n, loss = metrics["num-examples"], metrics["train_loss"]
        if not isinstance(n, int | float) or not 0 < n < math.inf:
            return f"num-examples={n!r} is not a positive number"
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            return f"train_loss={loss!r} is not a finite number"
        return None

    def weight(self, msg: Any) -> tuple[int, int | float]:
        """(weight the reply aggregates with, what it claimed): ``num-examples`` capped by ``cap``; the
        reply's MetricRecord is rewritten in place, since the strategies read the weight from it."""
        metrics = msg.content[METRICS_KEY]
        claimed, most = metrics["num-examples"], self.cap(msg)
        if claimed > most:
            metrics["num-examples"] = most
        return min(claimed, most), claimed


def _last_line(reason: str) -> str:
    """A ClientApp exception arrives as Ray's whole traceback; its last line holds the message."""
    lines = [ln.strip(" '>") for ln in re.sub(r"\x1b\[[0-9;]*m", "", reason).splitlines() if ln.strip(" '>")]
    return lines[-1][:300] if lines else ""


def release_arrays(replies: Iterable[Any]) -> None:
    """Drop the model arrays from aggregated replies. Flower's ``Strategy.start`` keeps a round's reply list
    until the next round's replies are in, so without this the ServerApp holds two rounds of client models
    at once (cnn100: 100 × 1.7 MB more at the peak); an ArrayRecord a strategy returned stays alive."""
    for msg in replies:
        if msg.has_content():
            for key in list(msg.content.array_records):
                del msg.content[key]


class GuardedStrategy(Strategy):
    """Wraps any strategy: validates train replies, records participation, skips thin rounds.

    Also shifts round numbers by ``offset`` so a resumed federation continues at round r+1 (Flower's
    ``start`` always counts from 1), and reseeds client sampling per round so a resumed run samples the
    same clients an uninterrupted one would have.
    """

    def __init__(self, inner: Any, check: ReplyCheck, min_replies: int, seed: int = 0, offset: int = 0) -> None:
        self.inner, self.check, self.min_replies = inner, check, min_replies
        self.seed, self.offset = seed, offset
        self.rounds: dict[int, RoundLog] = {}
        self.node_client: dict[int, int] = {}
        self._sent: list[Any] = []  # this round's instructions' metadata (the grid sets their message ids)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        rnd = server_round + self.offset
        random.seed(self.seed * 1_000_003 + rnd)
        messages = list(self.inner.configure_train(rnd, arrays, config, grid))
        self.rounds[rnd] = RoundLog(sampled=len(messages),
                                    bytes_sent=sum(record_bytes(m.content[ARRAYS_KEY]) for m in messages))
        self._sent = [m.metadata for m in messages]
        return messages

    def _sent_to(self) -> tuple[set[int], dict[str, int]]:
        """This round's instructions: the nodes they went to, and message_id -> node for those pushed."""
        return ({m.dst_node_id for m in self._sent},
                {m.message_id: m.dst_node_id for m in self._sent if m.message_id})

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        rnd = server_round + self.offset
        log = self.rounds.setdefault(rnd, RoundLog())
        if self.folds():
            return self._fold(rnd, replies, log)
        replies = list(replies)
        try:
            good = self._screen(rnd, replies, log)
            return self._aggregate(rnd, good, len(good), log)
        finally:
            release_arrays(replies)

    def _aggregate(self, rnd: int, good: list[Any], valid: int, log: RoundLog) -> tuple[Any, Any]:
        if valid < self.min_replies:
            logger.warning("round %d skipped: %d valid replies, federated.min_train_clients=%d",
                           rnd, valid, self.min_replies)
            log.skipped = True
            return None, None
        arrays, metrics = self.inner.aggregate_train(rnd, good)
        log.skipped = arrays is None  # e.g. Bulyan, or a DP wrapper that refused the round
        return arrays, metrics

    def folds(self) -> bool:
        """Whether the inner strategy's train aggregation is the num-examples-weighted mean of the replies'
        arrays and metrics (FedAvg's; FedProx, FedAvgM and the FedOpt family apply their server step to
        that mean), so replies can be folded into it one by one as they arrive (``_fold``)."""
        from flwr.serverapp import strategy as st
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        return (type(self.inner) in (st.FedAvg, st.FedProx, st.FedAvgM, st.FedAdagrad, st.FedAdam, st.FedYogi)
                and self.inner.weighted_by_key == "num-examples"
                and self.inner.train_metrics_aggr_fn is aggregate_metricrecords)

    def _fold(self, rnd: int, replies: Iterable[Any], log: RoundLog) -> tuple[Any, Any]:
        """Screen each reply as it arrives and add it to a running weighted sum, dropping its arrays at once;
        the inner strategy then aggregates one reply that holds the mean, weighted by the rows of all.

        The ServerApp so holds one client model (plus the sum) rather than a round's worth: replies come
        from ``StreamingGrid`` as the grid receives them (cnn100, 100 replies of 1.7 MB: the ServerApp grew
        ~195 MiB through round 1 with the whole list). Sums are float64; the mean is cast back to each
        array's dtype (integer buffers stay float64, as Flower's own mean leaves them).
        """
        from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

        nodes, sent_to = self._sent_to()
        answered: set[int] = set()
        sums: dict[str, np.ndarray] = {}
        dtypes: dict[str, np.dtype] = {}
        rows, loss, valid = 0, 0.0, 0
        for msg in replies:
            if self._screen_one(rnd, msg, log, sent_to, answered):
                n = msg.content[METRICS_KEY]["num-examples"]  # as capped by _screen_one
                for key, array in msg.content[ARRAYS_KEY].items():
                    values = array.numpy()
                    weighted = np.multiply(values, n, dtype=np.float64)
                    if key in sums:
                        sums[key] += weighted
                    else:
                        sums[key], dtypes[key] = weighted, values.dtype
                rows += n
                loss += float(msg.content[METRICS_KEY]["train_loss"]) * n
                valid += 1
            release_arrays([msg])
        self._unanswered(rnd, nodes - answered, log)
        if valid < self.min_replies:
            return self._aggregate(rnd, [], valid, log)
        mean = {k: v / rows if dtypes[k].kind not in "fc" else (v / rows).astype(dtypes[k]) for k, v in sums.items()}
        content = RecordDict({ARRAYS_KEY: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in mean.items()}),
                              METRICS_KEY: MetricRecord({"train_loss": loss / rows, "num-examples": rows})})
        logger.info("round %d: %d valid replies folded into their weighted mean as they arrived", rnd, valid)
        return self._aggregate(rnd, [Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)],
                               valid, log)

    def _screen(self, rnd: int, replies: list[Any], log: RoundLog) -> list[Any]:
        nodes, sent_to = self._sent_to()
        answered: set[int] = set()
        good = [msg for msg in replies if self._screen_one(rnd, msg, log, sent_to, answered)]
        self._unanswered(rnd, nodes - answered, log)
        return good

    def _screen_one(self, rnd: int, msg: Any, log: RoundLog, sent_to: dict[str, int], answered: set[int]) -> bool:
        """Record one reply in the round's log; whether it can be aggregated (its weight capped in place)."""
        # An error the SuperLink makes for a node it gave up on (NODE_UNAVAILABLE) comes from the SuperLink's
        # own id: the node is the one its instruction went to, counted once, not again as "no reply".
        node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if msg.has_error():
            log.failed += 1
            log.clients.append(self._row(rnd, node, "failed", _last_line(msg.error.reason or "")
                                         or f"error code {msg.error.code}"))
            return False
        if ARRAYS_KEY in msg.content.array_records:
            log.bytes_received += record_bytes(msg.content[ARRAYS_KEY])
        cid = self.check.client_of(msg)
        if cid is not None:
            self.node_client[node] = cid
        reason = self.check.problem(msg)
        if reason is not None:
            log.rejected += 1
            logger.warning("round %d: rejected the reply of client %s (node %d): %s",
                           rnd, self.node_client.get(node, "?"), node, reason)
            log.clients.append(self._row(rnd, node, "rejected", reason))
            return False
        n, claimed = self.check.weight(msg)
        note = ""
        if n < claimed:
            log.capped += 1
            note = f"num-examples={claimed!r} capped to {n} (the node's partition size)"
            logger.warning("round %d: client %s (node %d): %s", rnd, self.node_client.get(node, "?"), node, note)
        log.clients.append(self._row(rnd, node, "ok", note, float(msg.content[METRICS_KEY]["train_loss"]), n))
        return True

    def _unanswered(self, rnd: int, nodes: set[int], log: RoundLog) -> None:
        for node in nodes:
            log.failed += 1
            log.clients.append(self._row(rnd, node, "failed", "no reply before federated.round_timeout_s"))

    def _row(self, rnd: int, node: int, status: str, reason: str, loss: float | None = None,
             n: int | None = None) -> dict[str, Any]:
        return {"round": rnd, "client": self.node_client.get(node, -1), "node": node, "status": status,
                "train_loss": loss, "num_examples": n, "reason": reason}

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
