"""Every Prometheus metric of the fleet, named by Prometheus conventions.

Each process registers only what it touches (metrics are module globals of
the default registry). No user id ever becomes a label, and no label takes
a value from the request as sent: HTTP metrics are labelled by the route
template that matched (or ``unmatched``), a method from a fixed set and the
status the service chose (see :func:`http_labels`). A raw path as a label
let anyone grow /metrics and the process's memory without bound.
"""

import functools
import re
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HTTP_REQUESTS = Counter(
    "bkv_http_requests", "Requests served, by service, operation (route template), method and outcome (status)",
    ["service", "operation", "method", "outcome"]
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
RECOVER_ATTEMPTS_SPENT = Counter("bkv_recover_attempts_spent",
                                 "Attempts spent by recover_start: password guesses evaluated (committed decrements)")
RECOVERIES_SUCCEEDED = Counter("bkv_recoveries_succeeded", "Recoveries whose finalization verified")
RECORDS_DESTROYED = Counter("bkv_records_destroyed", "Records destroyed because attempts ran out")
LOCKOUT_HITS = Counter("bkv_lockout_hits", "Recovery attempts against a destroyed record")
REGISTRATIONS = Counter("bkv_registrations", "Registrations committed")
ACCOUNT_EVENTS = Counter("bkv_account_events", "Account events stored with their committed change, by kind "
                         "(bkv_protocol.v1.EventKind; never by user)", ["kind"])
ACCOUNT_EVENT_READS = Counter("bkv_account_event_reads", "Signed event feeds an island answered")
STATE_ANSWERS = Counter("bkv_state_answers", "Signed per-state answers (no_record, record_destroyed, too_early) "
                        "by where they came from: signed (a new signature in the token), kept (the hsm-proxy's "
                        "own, made before), remembered (an island replica's, no hsm-proxy call)", ["source"])
TOO_EARLY = Counter("bkv_recover_too_early", "Recover starts refused before the record's not-before time "
                    "(nothing spent)")
RESENDS_ANSWERED = Counter("bkv_resends_answered",
                           "Resent requests answered from the kept, committed answer (never evaluated again)")
# Rate limits (bkv_server.ratelimit): by scope (account, device), budget (guess,
# registration) and decision (admitted, refused, reserved: a second phase let
# through on its first phase's reservation). Never by user or device.
RATE_LIMIT_DECISIONS = Counter("bkv_rate_limit_decisions", "Rate limiter decisions, by scope, budget and decision",
                               ["scope", "budget", "decision"])
RESENDS_JOINED = Counter("bkv_resends_joined", "Resends that arrived while this island replica was still working "
                         "on the same request, and got its answer")


# -- bounded HTTP labels -------------------------------------------------------------
UNMATCHED = "unmatched"  # any path that is not a declared route
OTHER = "other"          # a method outside KNOWN_METHODS, a status outside 100-599
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RouteTable:
    """A service's declared route templates; :meth:`label` names the one a
    path matches, else ``unmatched``. Static paths are one set lookup;
    templates (``/x/{id}``, ``/files/{p:path}``) are tried in order."""

    def __init__(self, templates: Iterable[str]) -> None:
        templates = list(dict.fromkeys(templates))
        self.static = frozenset(t for t in templates if "{" not in t)
        self._templated = [(re.compile(_template_regex(t)), t) for t in templates if "{" in t]

    def label(self, path: str) -> str:
        if path in self.static:
            return path
        for rx, template in self._templated:
            if rx.fullmatch(path):
                return template
        return UNMATCHED


def _template_regex(template: str) -> str:
    out, pos = [], 0
    # Starlette's syntax: {name} or {name:convertor}; only :path spans slashes.
    for m in re.finditer(r"\{[A-Za-z_][A-Za-z0-9_]*(:[a-z]+)?\}", template):
        out += [re.escape(template[pos:m.start()]), ".+" if m.group(1) == ":path" else "[^/]+"]
        pos = m.end()
    return "".join(out + [re.escape(template[pos:])])


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER


def status_label(status: object) -> str:
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return str(status)
    return OTHER


def http_labels(routes: RouteTable, path: str, method: str, status: object) -> tuple[str, str, str]:
    """(operation, method, outcome) of a request, each from a bounded set."""
    return routes.label(path), method_label(method), status_label(status)


@functools.lru_cache(maxsize=4096)
def child(metric, *values: str):
    """``metric.labels(*values)``, looked up once: ``labels`` costs ~6 µs a
    call, several times per request on the hot path. Every label set is
    bounded (above), so the cache only bounds memory once more."""
    return metric.labels(*values)


def observe_http(service: str, routes: RouteTable, path: str, method: str, status: object, seconds: float) -> None:
    operation, method_, outcome = http_labels(routes, path, method, status)
    child(HTTP_LATENCY, service, operation).observe(seconds)
    child(HTTP_REQUESTS, service, operation, method_, outcome).inc()

# The HSM-held log (issue #17; bkv_island/ledger.py and bkv_hsm_proxy/log.py).
LOG_ENTRIES = Counter("bkv_log_entries", "Log entries an island appended and had committed", ["island"])
LOG_COMPACTED = Counter("bkv_log_entries_compacted", "Old log entries an island deleted from etcd", ["island"])
LOG_CHANGES_PER_ENTRY = Histogram("bkv_log_changes_per_entry", "Record changes carried by one log entry",
                                  buckets=(1, 2, 4, 8, 16, 32, 64))
LOG_STEP = Histogram("bkv_log_step_duration_seconds", "Time an island's appender spends in each step of a log "
                     "entry: apply, append (etcd), capture (a quorum of hsm-proxies), release", ["step"],
                     buckets=_LATENCY_BUCKETS)
LOG_APPENDER = Counter("bkv_log_appender", "An island replica's appender lease: acquired, waited (another held "
                       "it), went_on (appended without it after the wait), lost, released", ["event"])
LOG_DIVERGED = Counter("bkv_log_diverged", "Times an island found etcd behind the HSM boundary or not adding up "
                       "to its log head (it fails closed)", ["island"])
LOG_CAPTURES = Counter("bkv_log_captures", "Log entries this hsm-proxy captured", ["island"])
LOG_REFUSED = Counter("bkv_log_refused", "Log steps this hsm-proxy refused, by reason", ["reason"])
STATE_FILE_WRITES = Counter("bkv_state_file_writes", "Writes (with fsync) of this hsm-proxy's state file")
HSM_FROZEN = Gauge("bkv_hsm_frozen", "1 while this hsm-proxy is frozen for a change of the member set")
HSM_MEMBER_EPOCH = Gauge("bkv_hsm_member_epoch", "The epoch of the member set this hsm-proxy serves in")
LOG_HEAD_INDEX = Gauge("bkv_log_head_index", "The newest log index this hsm-proxy captured, per island", ["island"])
