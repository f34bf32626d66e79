"""The command line that starts each service of the Orchard stack, in one place.

``docker-compose.yml`` runs these exact commands in its containers, and the integration tests start
the same commands as native processes on loopback; ``tests/cluster/test_compose.py`` checks that the
two agree, so what the tests prove is what the stack runs. Each function returns an argv list.
"""

from __future__ import annotations

# The MLflow server's environment beside its argv. MLflow 3 starts a job runner with every server (huey
# consumers for GenAI scorers and trace archival: ~9 more processes, ~2 GB resident, each importing MLflow)
# that Orchard never queues work for; on a small machine it is most of the server's start-up.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                  port: int = 5000, basic_auth: bool = False) -> list[str]:
    """MLflow tracking server that also serves (proxies) the artifact store to clients.

    ``basic_auth``: MLflow's basic auth behind Orchard's path-traversal filter (``orchard-auth``, see
    ``orchard.remote.mlflow_guard``)."""
    # uvicorn kills a worker that does not answer its health ping within 5 s; a worker importing MLflow on a
    # busy small machine takes longer, and the restarts then go on for minutes. 60 s ends that loop.
    uvicorn = "--timeout-worker-healthcheck 60"
    cmd = ["mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts_destination, "--serve-artifacts",
           "--host", host, "--port", str(port)]
    if basic_auth:
        # h11, not httptools: httptools drops what a client sent after '#', so the filter could not see it.
        cmd += ["--app-name", "orchard-auth"]
        uvicorn = "--http h11 " + uvicorn
    return cmd + ["--uvicorn-opts", uvicorn]


def ray_head(port: int = 6379, dashboard_host: str = "127.0.0.1", dashboard_port: int = 8265,
             num_cpus: int | None = None, node_ip: str | None = None) -> list[str]:
    """Ray head node; stays in the foreground (``--block``) as a container's main process must."""
    cmd = ["ray", "start", "--head", f"--port={port}", f"--dashboard-host={dashboard_host}",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats", "--block"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    return cmd


def ray_worker(head_address: str, num_cpus: int | None = None, node_ip: str | None = None) -> list[str]:
    """A Ray worker node joining the head at ``host:port``."""
    cmd = ["ray", "start", f"--address={head_address}", "--disable-usage-stats", "--block"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    return cmd


def superlink(certs_dir: str, address: str = "127.0.0.1:9093", *, auth: bool = True, database: str | None = None,
              install_dependencies: bool = False, log_file: str | None = None) -> list[str]:
    """Flower 1.42 SuperLink over TLS; with ``auth`` only SuperNode keys registered through the Control API connect.

    Since 1.42 one HTTP(S) port at ``address`` serves the Fleet API (SuperNodes), the Control API
    (``flwr run``, ``flwr supernode register``) and the Runtime API (its own ServerApp processes); the old
    ``--fleet-api-address``/``--control-api-address`` are deprecated. The certificate must name every host
    clients dial, 127.0.0.1 included (the SuperLink's ServerApp runner dials it). ``install_dependencies``
    off: the image already holds the app's dependencies, and ``uv sync`` would need the network.
    """
    host, _, port = address.rpartition(":")
    cmd = ["flower-superlink", "--ssl-ca-certfile", f"{certs_dir}/ca.crt",
           "--ssl-certfile", f"{certs_dir}/server.pem", "--ssl-keyfile", f"{certs_dir}/server.key",
           "--host", host, "--port", port]
    if database:
        cmd += ["--database", database]  # default: in memory, so runs and registrations end with the process
    if auth:
        cmd.append("--enable-supernode-auth")
    if not install_dependencies:
        cmd.append("--disable-runtime-dependency-installation")
    if log_file:
        cmd += ["--log-file", log_file]
    return cmd


def supernode(superlink_address: str, certs_dir: str, keys_dir: str, partition_id: int, num_partitions: int,
              *, port: int = 9094, data_dir: str | None = None, max_wait_time: float | None = None) -> list[str]:
    """A Flower SuperNode over TLS, authenticated by ``keys_dir/client_<partition_id>``, reading its own data.

    1.42 derives the public key from the private one (``--auth-supernode-public-key`` is deprecated). ``port``
    is this SuperNode's local Runtime API for its ClientApp processes (one per SuperNode on a shared host).
    ``data_dir`` becomes node config ``data-dir``: the folder with this node's ``manifest.json`` and
    ``client-<partition_id>.parquet`` (``python -m orchard.federated.app export-nodes`` writes them).
    """
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_dir:
        node_config += f' data-dir="{data_dir}"'
    cmd = ["flower-supernode", "--superlink", superlink_address,
           "--root-certificates", f"{certs_dir}/ca.crt",
           "--auth-supernode-private-key", f"{keys_dir}/client_{partition_id}",
           "--node-config", node_config, "--port", str(port)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    return cmd
