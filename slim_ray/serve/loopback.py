"""Keep every Serve listener on loopback when Ray itself runs on loopback.

Ray Serve 2.60 starts an inter-deployment gRPC server in every replica bound to ``[::]:0`` (all
interfaces; ``ray/serve/_private/replica.py``), with no option to change it. On a node whose Ray
address is loopback (``slim-ray serve`` on one machine: ``slim_ray.runtime`` pins Ray to
127.0.0.1), nothing outside the machine may reach a replica, so the address is rewritten to
127.0.0.1. On a cluster node (a routable node IP) the address is left as Ray chose it: replicas on
other nodes must reach it there. ``tests/serve/test_serve_graph.py`` scans the listeners of every
Serve process, so a Ray upgrade that moves this code fails that test instead of silently widening
the exposure.
"""

from __future__ import annotations

import ipaddress


def _node_is_loopback() -> bool:
    try:
        import ray

        return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback
    except Exception:
        return False


def pin_replica_grpc_to_loopback() -> bool:
    """Patch the replica's gRPC bind address (idempotent). Returns whether the hook is in place."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        return False
    if getattr(original, "_slim_ray_loopback", False):
        return True

    def add_port(server, address: str):
        if address.startswith("[::]:") and _node_is_loopback():
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._slim_ray_loopback = True
    replica.add_port_to_grpc_server = add_port
    return True
