"""The Envoy configuration: one listener (the only port reachable from
outside the pod), the ext_proc filter pointing at the Noise processor, the
frontend on loopback as the only upstream, and the admin interface (with
/stats/prometheus) on loopback.

With ``ops_port`` a second, plaintext listener serves only what probes and
Prometheus need -- Envoy's ``/ready`` and ``/stats/prometheus`` and the
frontend's ``/healthz``, ``/readyz`` and ``/metrics`` -- because in a pod
the frontend binds loopback and the kubelet cannot reach it there. No vault
API path is routed on it."""

from __future__ import annotations

import json
from dataclasses import dataclass


_EXT_PROC = "envoy.filters.http.ext_proc"
_NOT_FOUND = json.dumps({"error": {"code": "not_found", "retryable": False,
                                   "message": "only POST /noise/handshake, POST /noise/v1 and GET /v1/bundle are served here"}})


_LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
# Distinct source addresses Envoy keeps a bucket for, per route (least recently used go).
_SOURCE_BUCKETS = 100_000


@dataclass(frozen=True)
class SourceLimit:
    """Requests a second sustained (``per_second``) and at once (``burst``)
    from one source address, per Envoy; ``per_second`` 0: unlimited."""

    per_second: int
    burst: int


@dataclass(frozen=True)
class SourceLimits:
    """Per-source budgets at the edge (docs/architecture.md, "Rate limits"):
    Noise handshakes, sealed requests and bundle fetches. A source address
    may be a NAT of many devices, so these are for floods only."""

    handshake: SourceLimit = SourceLimit(20, 100)
    transport: SourceLimit = SourceLimit(100, 400)
    bundle: SourceLimit = SourceLimit(5, 20)


# The refusal, in the one error body shape (bkv_protocol.wire.ErrorBody): over
# a per-source limit, before the processor or any Python runs. In clear: the
# device's SDK treats it as the edge's word (bkv/transport.py: EdgeRefused).
_RATE_LIMITED = {"error": {"code": "rate_limited", "retryable": True, "retry_after": 1,
                           "message": "too many requests from this address; retry after Retry-After seconds"}}


def _source_limit(budget: str, limit: SourceLimit) -> dict:
    """Envoy's local rate limit for one route: a token bucket per source
    address (a wildcard descriptor on ``remote_address``), ``Retry-After: 1``
    (the bucket refills every second) on a 429."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": f"bkv_source_{budget}",
        "token_bucket": {"max_tokens": 1_000_000, "tokens_per_fill": 1_000_000, "fill_interval": "1s"},
        "filter_enabled": {"runtime_key": f"bkv_source_{budget}_enabled",
                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": f"bkv_source_{budget}_enforced",
                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "rate_limits": [{"actions": [{"remote_address": {}}]}],
        "descriptors": [{"entries": [{"key": "remote_address"}], "token_bucket": {
            "max_tokens": limit.burst, "tokens_per_fill": limit.per_second, "fill_interval": "1s"}}],
        "always_consume_default_token_bucket": False,
        "max_dynamic_descriptors": _SOURCE_BUCKETS,
        "response_headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


def _limited(route: dict, budget: str, limits: SourceLimits | None) -> dict:
    limit = getattr(limits, budget) if limits is not None else None
    if limit is not None and limit.per_second > 0:
        route["typed_per_filter_config"][_LOCAL_RATELIMIT] = _source_limit(budget, limit)
    return route


def _mode(request_headers: str = "SKIP", request_body: str = "NONE", response_headers: str = "SKIP",
          response_body: str = "NONE") -> dict:
    return {"request_header_mode": request_headers, "response_header_mode": response_headers,
            "request_body_mode": request_body, "response_body_mode": response_body,
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}


def _noise_route(path: str, route: str, mode: dict) -> dict:
    """POST ``path`` to the frontend through the processor, which learns the
    route from the stream's initial metadata (services/edge/noise-processor/exchange.go)."""
    return {"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
            "route": {"cluster": "frontend", "timeout": "30s"},
            "typed_per_filter_config": {_EXT_PROC: {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "overrides": {"processing_mode": mode,
                              "grpc_initial_metadata": [{"key": "x-bkv-edge-route", "value": route}]}}}}


def _vault_routes(noise: bool, limits: SourceLimits | None = None) -> list[dict]:
    if not noise:  # the benchmark's plain baseline
        return [{"match": {"prefix": "/"}, "route": {"cluster": "frontend", "timeout": "30s"}}]
    # Per-source limits are checked first on each route, before the processor (docs/architecture.md).
    return [
        # Headers go to the processor only because Envoy holds them back from
        # the upstream (or the client) while the processor has them: the
        # processor answers the request headers without reading them, and
        # changes them when it has the body. The session id travels in the body.
        # The handshake is answered by the processor from the request body.
        _limited(_noise_route("/noise/handshake", "handshake", _mode("SEND", "BUFFERED")), "handshake", limits),
        # The response headers carry the inner status, which the processor
        # seals with the body and replaces with 200.
        _limited(_noise_route("/noise/v1", "transport", _mode("SEND", "BUFFERED", "SEND", "BUFFERED")), "transport",
                 limits),
        # The validation bundle is public and signed; a new client needs it
        # before it can pin the edge key (docs/ota.md). In clear, no credentials.
        _limited({"match": {"path": "/v1/bundle", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                  "route": {"cluster": "frontend", "timeout": "10s"},
                  "request_headers_to_remove": ["authorization", "x-bkv-device-key"],
                  "typed_per_filter_config": {_EXT_PROC: {
                      "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                      "disabled": True}}}, "bundle", limits),
        {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": _NOT_FOUND}},
         "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                      "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
    ]


def render(listen_host: str, listen_port: int, upstream_port: int, processor_port: int, admin_port: int,
           processor_host: str = "127.0.0.1", upstream_host: str = "127.0.0.1", noise: bool = True,
           ops_port: int = 0, limits: SourceLimits | None = SourceLimits()) -> str:
    """``noise=False`` renders the same proxy without the processor: only for
    the benchmark's plain-HTTP-through-Envoy baseline, never deployed.
    ``limits``: the per-source budgets (None: none)."""
    def cluster(name: str, host: str, port: int, http2: bool = False) -> dict:
        c = {
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        }
        # Idle upstream connections close before the frontend's keep-alive
        # timeout (bkv_server.http.SERVER_KEEP_ALIVE_S), so Envoy never sends a
        # request on a connection the frontend is closing.
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "10s"},
            "explicit_http_config": {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}}}
        return c

    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "noise", "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "noise",
                        "use_remote_address": True,
                        "max_request_headers_kb": 16,
                        "route_config": {"name": "vault", "virtual_hosts": [{
                            "name": "vault", "domains": ["*"],
                            "routes": _vault_routes(noise, limits)}]},
                        # Envoy's own 429s (the per-source limits) in the one error body shape;
                        # only Envoy's local replies pass here, never the frontend's answers.
                        "local_reply_config": {"mappers": [{
                            "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                                "default_value": 429, "runtime_key": "bkv_local_reply_429"}}}},
                            "body_format_override": {"json_format": _RATE_LIMITED,
                                                     "content_type": "application/json"}}]},
                        "http_filters": ([
                            # Off unless a route turns it on (_limited): per-source budgets,
                            # first, so a refused request costs the processor nothing.
                            {"name": _LOCAL_RATELIMIT, "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                                "stat_prefix": "bkv_source"}},
                        ] if limits is not None else []) + ([
                            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                                "grpc_service": {"envoy_grpc": {"cluster_name": "noise_processor"}, "timeout": "2s"},
                                "failure_mode_allow": False,  # fail closed: nothing passes unprocessed
                                "message_timeout": "2s",
                                "allow_mode_override": False,
                                # The processor rewrites :path; it removes every upstream header
                                # of a sealed answer but its allow-list, x-envoy-* included; and a
                                # mutation Envoy refused would let something pass unsealed, so a
                                # refused one fails the request instead of being skipped.
                                "mutation_rules": {"allow_all_routing": True, "allow_envoy": True,
                                                   "disallow_is_error": True},
                                # The processor rewrites :path but the request keeps the route it
                                # matched (the Noise route to the frontend).
                                "route_cache_action": "RETAIN",
                                # Off unless a route turns it on (_vault_routes).
                                "processing_mode": _mode()}},
                        ] if noise else []) + [
                            # No x-envoy-upstream-service-time (nor other x-envoy-* answers):
                            # how long the vault took tells outcomes apart.
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                "suppress_envoy_headers": True}},
                        ],
                    }}]}],
            }],
            "clusters": [cluster("frontend", upstream_host, upstream_port),
                         cluster("noise_processor", processor_host, processor_port, http2=True)],
        },
    }
    if ops_port:
        def exact(path: str, cluster_name: str) -> dict:
            return {"match": {"path": path}, "route": {"cluster": cluster_name, "timeout": "5s"}}

        config["static_resources"]["clusters"].append(cluster("envoy_admin", "127.0.0.1", admin_port))
        config["static_resources"]["listeners"].append({
            "name": "ops", "address": {"socket_address": {"address": listen_host, "port_value": ops_port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ops",
                    "route_config": {"name": "ops", "virtual_hosts": [{
                        "name": "ops", "domains": ["*"],
                        "routes": [exact("/ready", "envoy_admin"), exact("/stats/prometheus", "envoy_admin"),
                                   exact("/healthz", "frontend"), exact("/readyz", "frontend"),
                                   exact("/metrics", "frontend"),
                                   {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}],
        })
    return json.dumps(config, indent=1)
