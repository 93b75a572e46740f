"""Every loopback port of the local fleet, from one base port.

The only place a port is derived from ``base_port``: the fleet, the tests,
the load tests and docs/architecture.md (its port table is checked against
:meth:`Ports.table`) all ask a :class:`Ports`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ISLANDS = ("island-a", "island-b")


@dataclass(frozen=True)
class Ports:
    """The ports of one fleet layout. The defaults are `bkv dev up`'s fleet."""

    base_port: int = 18000
    etcd_members: int = 1
    hsm_proxies: int = 1
    islands: tuple[str, ...] = DEFAULT_ISLANDS
    replicas_per_island: int = 2

    def __post_init__(self) -> None:
        ports = self.all()
        if len(set(ports)) != len(ports):
            raise ValueError(f"too many parts for one base port: {self}")

    def etcd_client(self, i: int) -> int:
        return self.base_port + 379 + 2 * i

    def etcd_peer(self, i: int) -> int:
        return self.base_port + 380 + 2 * i

    def hsm_proxy(self, i: int) -> int:
        return self.base_port + 100 + i

    def island(self, j: int, r: int) -> int:
        """Replica ``r`` of the ``j``-th island (in the order of ``islands``)."""
        return self.base_port + 200 + 10 * j + r

    @property
    def frontend(self) -> int:
        return self.base_port + 80

    @property
    def witness(self) -> int:
        return self.base_port + 350

    @property
    def processor(self) -> int:
        return self.base_port + 2

    @property
    def processor_metrics(self) -> int:
        return self.base_port + 3

    @property
    def envoy(self) -> int:
        return self.base_port + 443

    @property
    def envoy_admin(self) -> int:
        return self.base_port + 901

    @property
    def frontend_url(self) -> str:
        return f"http://127.0.0.1:{self.frontend}"

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy}"

    @property
    def witness_url(self) -> str:
        return f"http://127.0.0.1:{self.witness}"

    def table(self) -> list[tuple[str, int, str]]:
        """(name, port, what) for every port of the layout; a name without a
        suffix is also the process's name in `bkv dev status`."""
        rows = [
            ("envoy", self.envoy, "Envoy's Noise listener: where clients connect"),
            ("envoy admin", self.envoy_admin, "Envoy's admin: /ready, /stats/prometheus"),
            ("noise-processor", self.processor, "the Noise processor (Envoy's ext_proc, gRPC)"),
            ("noise-processor metrics", self.processor_metrics, "the Noise processor's /metrics"),
            ("frontend", self.frontend, "the frontend (plaintext; behind Envoy, or direct with --plaintext)"),
            ("witness", self.witness, "the witness (countersigns validation bundles)"),
        ]
        rows += [(f"hsm-proxy{i}", self.hsm_proxy(i), f"hsm-proxy {i}") for i in range(self.hsm_proxies)]
        rows += [(f"{island}-{r}", self.island(j, r), f"{island}, replica {r}")
                 for j, island in enumerate(self.islands) for r in range(self.replicas_per_island)]
        for i in range(self.etcd_members):
            rows += [(f"etcd{i}", self.etcd_client(i), f"etcd member {i}: clients"),
                     (f"etcd{i} peers", self.etcd_peer(i), f"etcd member {i}: peers")]
        return rows

    def all(self) -> list[int]:
        return [port for _, port, _ in self.table()]
