"""Every Prometheus metric of the fleet, named by Prometheus conventions.

Each process registers only what it touches (metrics are module globals of
the default registry). No user id ever becomes a label.
"""

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HTTP_REQUESTS = Counter(
    "bkv_http_requests", "Requests served, by service, operation and outcome", ["service", "operation", "outcome"]
)
HTTP_LATENCY = Histogram(
    "bkv_http_request_duration_seconds", "Request latency", ["service", "operation"], buckets=_LATENCY_BUCKETS
)
HSM_OP = Histogram(
    "bkv_hsm_operation_duration_seconds", "Time inside the HSM boundary per operation", ["operation"],
    buckets=_LATENCY_BUCKETS,
)
ETCD_TXN = Histogram(
    "bkv_etcd_txn_duration_seconds", "etcd transaction latency", ["operation"], buckets=_LATENCY_BUCKETS
)
ETCD_BATCH = Histogram("bkv_etcd_swaps_per_txn", "Compare-and-swaps sent together in one etcd transaction",
                       buckets=(1, 2, 4, 8, 16, 32, 64))
ETCD_CONFLICTS = Counter("bkv_etcd_txn_conflicts", "Compare-and-swap transactions that lost a race", ["operation"])
RETRIES = Counter("bkv_retries", "Retries after a retryable failure, by target", ["target"])
ISLAND_ROUTING = Counter("bkv_island_routing", "Requests routed to each island", ["island"])

# Security counters.
GUESSES_EVALUATED = Counter("bkv_guesses_evaluated", "Password guesses evaluated (committed decrements)")
RECOVERIES_SUCCEEDED = Counter("bkv_recoveries_succeeded", "Recoveries whose finalization verified")
RECORDS_DESTROYED = Counter("bkv_records_destroyed", "Records destroyed because attempts ran out")
LOCKOUT_HITS = Counter("bkv_lockout_hits", "Recovery attempts against a destroyed record")
REGISTRATIONS = Counter("bkv_registrations", "Registrations committed")
RESENDS_ANSWERED = Counter("bkv_resends_answered",
                           "Resent requests answered from the kept, committed answer (never evaluated again)")

