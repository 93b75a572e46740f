"""Connecting to etcd with ``aetcd`` (asyncio).

Several endpoints become one gRPC channel with round-robin balancing, so a
dead member drops out of rotation and calls go to the living ones; a call
that was in flight on the dead member fails with ``ConnectionFailedError``
and is retried by the caller through :func:`bkv_common.retry.retry`.
"""

from __future__ import annotations

import ipaddress

import aetcd
import aetcd.exceptions

RPC_TIMEOUT_S = 5

# Errors after which the same operation may simply be tried again.
RETRYABLE = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
)


def _split(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.strip().removeprefix("http://")
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_client(endpoints: str) -> aetcd.Client:
    """``endpoints`` is a comma list of host:port."""
    hosts = [_split(e) for e in endpoints.split(",") if e.strip()]
    if not hosts:
        raise ValueError("no etcd endpoints configured")
    options = {"grpc.lb_policy_name": "round_robin", "grpc.enable_retries": 0,
               "grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 1000}
    if len(hosts) == 1 or not all(_is_ip(h) for h, _ in hosts):
        # A single name (in Kubernetes, the etcd client Service) balances itself.
        host, port = hosts[0]
        return aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT_S, options=options)
    # aetcd builds its target as f"{host}:{port}"; gRPC's ipv4 resolver takes a list.
    listed = ",".join(f"{h}:{p}" for h, p in hosts[:-1])
    last_host, last_port = hosts[-1]
    return aetcd.Client(host=f"ipv4:{listed},{last_host}", port=last_port, timeout=RPC_TIMEOUT_S, options=options)


async def connect(endpoints: str) -> aetcd.Client:
    client = make_client(endpoints)
    await client.connect()
    return client
