"""The command line that starts each service of the Orchard stack, in one place.

``docker-compose.yml`` runs these exact commands in its containers, and the integration tests start
the same commands as native processes on loopback; ``tests/cluster/test_compose.py`` checks that the
two agree, so what the tests prove is what the stack runs. Each function returns an argv list.
"""

from __future__ import annotations


def mlflow_server(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                  port: int = 5000, basic_auth: bool = False) -> list[str]:
    """MLflow tracking server that also serves (proxies) the artifact store to clients."""
    cmd = ["mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts_destination, "--serve-artifacts",
           "--host", host, "--port", str(port)]
    if basic_auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


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


def superlink(certs_dir: str, fleet_address: str = "127.0.0.1:9092", control_address: str = "127.0.0.1:9093",
              auth: bool = True, database: str = ":flwr-in-memory-state:") -> list[str]:
    """Flower SuperLink over TLS; with ``auth`` only registered SuperNode keys may connect."""
    cmd = ["flower-superlink", "--ssl-ca-certfile", f"{certs_dir}/ca.crt",
           "--ssl-certfile", f"{certs_dir}/server.pem", "--ssl-keyfile", f"{certs_dir}/server.key",
           "--fleet-api-address", fleet_address, "--control-api-address", control_address,
           "--database", database]
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode(superlink_address: str, certs_dir: str, keys_dir: str, partition_id: int, num_partitions: int,
              port: int = 9094) -> list[str]:
    """A Flower SuperNode over TLS, authenticated by its key pair, reading its own partition."""
    return ["flower-supernode", "--superlink", superlink_address,
            "--root-certificates", f"{certs_dir}/ca.crt",
            "--auth-supernode-private-key", f"{keys_dir}/client_{partition_id}",
            "--auth-supernode-public-key", f"{keys_dir}/client_{partition_id}.pub",
            "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}",
            "--port", str(port)]
