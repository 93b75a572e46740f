"""Connecting to etcd with ``aetcd`` (asyncio).

Several endpoints become one gRPC channel with round-robin balancing, so a
dead member drops out of rotation and calls go to the living ones; a call
that was in flight on the dead member fails with ``ConnectionFailedError``
and is retried by the caller through :func:`bkv_protocol.retry.retry`.
"""

from __future__ import annotations

import ipaddress

import aetcd
import aetcd.exceptions

RPC_TIMEOUT_S = 5
# Every connection to a member is pinged every KEEPALIVE_MS and dropped when a
# ping goes unanswered for KEEPALIVE_TIMEOUT_MS (gRPC also sets TCP_USER_TIMEOUT
# to it). Without it, a connection to a member that was cut off looks healthy
# to round robin: calls sent on it wait out RPC_TIMEOUT_S, and after the
# network heals they still wait for TCP's backed-off retransmissions --
# seconds without a commit. The members must allow pings this often:
# --grpc-keepalive-min-time (etcd's default, 5 s, is longer) is set to
# ETCD_KEEPALIVE_MIN_TIME by the dev fleet and the chart.
KEEPALIVE_MS = 2000
# Long enough for a ping behind a slow, lossy link (the sites test throttles
# every link); short enough to replace a dead connection before a cut heals.
KEEPALIVE_TIMEOUT_MS = 5000
ETCD_KEEPALIVE_MIN_TIME = "1s"

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
               "grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 1000,
               "grpc.keepalive_time_ms": KEEPALIVE_MS, "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
               "grpc.keepalive_permit_without_calls": 1, "grpc.http2.max_pings_without_data": 0}
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
