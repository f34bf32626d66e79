import os as _os

__version__ = "0.1.0"

# A process with a busy gRPC channel (Ray's clients, the raylet call in orchard.raystart) that forks a
# child which then execs (Spark launching its JVM, any subprocess with preexec_fn) crashes that child in
# about 1 fork of 50 with grpcio >= 1.80: gRPC's fork handlers restart its poller in the child, whose epoll
# descriptor the child has just closed (grpc/grpc#43055; CI lost a Spark launch to it: "Java gateway
# process exited"). Nothing here uses gRPC across a fork, so its fork support is off unless set.
# Set before any gRPC import: gRPC reads it once.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
