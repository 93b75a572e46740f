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


def render(listen_host: str, listen_port: int, upstream_port: int, processor_port: int, admin_port: int,
           processor_host: str = "127.0.0.1", upstream_host: str = "127.0.0.1", noise: bool = True,
           ops_port: int = 0) -> str:
    """``noise=False`` renders the same proxy without the processor: only for
    the benchmark's plain-HTTP-through-Envoy baseline, never deployed."""
    def cluster(name: str, host: str, port: int, http2: bool = False) -> dict:
        c = {
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        }
        # Idle upstream connections close before the frontend's keep-alive
        # timeout (bkv_common.http.SERVER_KEEP_ALIVE_S), so Envoy never sends a
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
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "frontend", "timeout": "30s"}}]}]},
                        "http_filters": ([
                            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                                "grpc_service": {"envoy_grpc": {"cluster_name": "noise_processor"}, "timeout": "2s"},
                                "failure_mode_allow": False,  # fail closed: nothing passes unprocessed
                                "message_timeout": "2s",
                                "allow_mode_override": False,
                                "mutation_rules": {"allow_all_routing": True},
                                "processing_mode": {
                                    "request_header_mode": "SEND", "response_header_mode": "SEND",
                                    "request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED",
                                    "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}},
                        ] if noise else []) + [
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
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
