"""The chart on a real one-node Kubernetes (make cluster): the official
kube-apiserver, controller-manager, scheduler, kubelet and kube-proxy built
from k8s.io/kubernetes, Debian's containerd and runc, bridge CNI, CoreDNS,
the local-path provisioner; the image built locally and the chart installed
through Helm's own engine. What only Kubernetes itself can show: init
containers and native sidecars in order, probes, Service DNS, the fleet-init
Role, PVCs, the security contexts as applied, pods coming back, helm upgrade
and helm test.

The node comes up once per run (scripts/cluster-up.sh, as `make cluster`)
and goes down at the end (scripts/cluster-down.sh) unless BKV_CLUSTER_KEEP=1;
BKV_CLUSTER_REUSE=1 starts from a node already up instead of a new one.
Root only; run with BKV_CLUSTER_TESTS=1 (docs/kubernetes.md):

    BKV_CLUSTER_TESTS=1 .venv/bin/python -m pytest -q tests/test_cluster.py

Bridge CNI does not enforce NetworkPolicies: the chart's policies are checked
by the static evaluator in tests/test_chart.py, not here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bkv import errors
from bkv.sdk import VaultClient
from bkv.transport import AsyncNoiseTransport
from bkv_protocol.encoding import b64d
from bkv_protocol.secrets import BackupKey
from bkv_protocol.noise import StaticKey

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "k8s" / "cluster"))
import install as node  # noqa: E402  (k8s/cluster/install.py)
from support import procs  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("BKV_CLUSTER_TESTS") != "1",
                       reason="the one-node Kubernetes tests run with BKV_CLUSTER_TESTS=1 (docs/kubernetes.md)"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="a kubelet needs root"),
    # Longer than the global 300 s: the module's fixture brings the node up
    # and installs the chart (~2-3 min, nothing built) inside the first
    # test's time, and a test may roll every pod.
    pytest.mark.timeout(900),
]

UID = GID = 10001


@pytest.fixture(scope="module")
def cluster():
    """The node and the install, once for the module: from nothing (a node
    left running, perhaps by another work tree with another token issuer, is
    removed first) unless BKV_CLUSTER_REUSE=1."""
    t = time.monotonic()
    # Built by the set-up step (scripts/setup.sh with BKV_CLUSTER_TESTS=1, as
    # make test and .ci/run run it), never here: a cold build takes longer
    # than any test's time limit.
    for check in ("cluster-build.sh", "cluster-images.sh"):
        built = procs.run(["bash", str(REPO / "scripts" / check), "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
        assert built.returncode == 0, (f"{built.stderr.strip()}: run `BKV_CLUSTER_TESTS=1 bash scripts/setup.sh` "
                                       "first (make test and .ci/run do)")
    # A node kept for later (BKV_CLUSTER_KEEP=1) must not carry the session's
    # mark, or the end of the session would end its daemons (conftest).
    keep = os.environ.get("BKV_CLUSTER_KEEP") == "1"
    env = {k: v for k, v in os.environ.items() if not (keep and k == procs.SESSION_MARK)}
    if os.environ.get("BKV_CLUSTER_REUSE") != "1":
        procs.run(["bash", str(REPO / "scripts" / "cluster-down.sh")], cwd=REPO, timeout=600,
                  capture_output=True)
    proc = procs.run(["bash", str(REPO / "scripts" / "cluster-up.sh")], cwd=REPO, text=True, env=env,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=840)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"make cluster failed:\n{proc.stdout[-6000:]}"
    print(f"cluster up and chart installed in {time.monotonic() - t:.0f} s")
    yield node
    if not keep:
        procs.run(["bash", str(REPO / "scripts" / "cluster-down.sh")], cwd=REPO, timeout=600)


def keys() -> tuple[bytes, bytes]:
    cm = node.kubectl_json("get", "configmap", f"{node.RELEASE}-fleet-public")["data"]
    return b64d(cm["fleet_public_key"]), b64d(cm["edge_public_key"])


def vault_client(user: str) -> VaultClient:
    """A new device reaching the frontend Service from the host, through Envoy and Noise."""
    from bkv_dev.issuer import DevIssuer

    fleet_key, edge_key = keys()
    url = node.edge_url()
    device = StaticKey.generate()
    token = DevIssuer.load(node.ISSUER_DIR).mint(user, device_key_b64=base64.b64encode(device.public).decode())
    return VaultClient(url, fleet_key, user, token, transport=AsyncNoiseTransport(url, edge_key, device))


async def register(user: str, password: str) -> BackupKey:
    key = BackupKey(os.urandom(32))
    async with vault_client(user) as c:
        await c.register(key, password)
    return key


async def wrong_guess(user: str) -> int:
    async with vault_client(user) as c:
        with pytest.raises(errors.WrongPassword) as wrong:
            await c.recover("not the password")
    return wrong.value.attempts_left


async def recover(user: str, password: str) -> BackupKey:
    async with vault_client(user) as c:
        return (await c.recover(password)).key


async def serving(deadline_s: float = 180) -> float:
    """Wait until the whole path serves again (frontend, island, etcd, HSM):
    a throwaway account registers. Returns the seconds it took. A pod that
    came back may still hold connections to the one it replaced; the vault
    answers 'unavailable' meanwhile (a client tries again), and only a
    throwaway account pays for it, never the account under test."""
    t = time.monotonic()
    while True:
        try:
            await register(f"probe-{os.urandom(4).hex()}", "probe password")
            return time.monotonic() - t
        except errors.VaultUnavailable:
            assert time.monotonic() - t < deadline_s, "the fleet did not serve again"
            await asyncio.sleep(1)


def pods() -> list[dict]:
    return [p for p in node.kubectl_json("get", "pods")["items"] if not p["metadata"].get("deletionTimestamp")]


def component(pod: dict) -> str:
    return pod["metadata"]["labels"].get("app.kubernetes.io/component", "")


def test_every_pod_is_ready_and_the_fleet_init_job_completed(cluster):
    job = f"{node.RELEASE}-fleet-init-{node.revision()}"
    assert node.not_ready(job) == []
    kinds = {component(p) for p in pods()}
    assert {"etcd", "island", "hsm-proxy", "frontend", "fleet-init"} <= kinds
    # fleet-init's Role let it write the public ConfigMap, and nothing else.
    data = node.kubectl_json("get", "configmap", f"{node.RELEASE}-fleet-public")["data"]
    assert data["fleet_public_key"] and data["edge_public_key"]
    # The PVCs were bound by the provisioner.
    pvcs = node.kubectl_json("get", "pvc")["items"]
    assert pvcs and all(p["status"]["phase"] == "Bound" for p in pvcs)


def test_init_containers_ran_in_order_and_the_sidecars_started_before_the_frontend(cluster):
    pod = next(p for p in pods() if component(p) == "frontend")
    inits = {s["name"]: s for s in pod["status"]["initContainerStatuses"]}
    # render-envoy and edge-public-key ran to completion; noise-processor and envoy are native sidecars, running.
    for name in ("render-envoy", "edge-public-key"):
        assert inits[name]["state"]["terminated"]["exitCode"] == 0
    for name in ("noise-processor", "envoy"):
        assert "running" in inits[name]["state"] and inits[name]["ready"] is True
    ended = inits["edge-public-key"]["state"]["terminated"]["finishedAt"]
    started = {n: inits[n]["state"]["running"]["startedAt"] for n in ("noise-processor", "envoy")}
    main = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert ended <= started["noise-processor"] <= started["envoy"] <= main


def proc_status(pod: str, container: str) -> dict[str, str]:
    out = node.kubectl("exec", pod, "-c", container, "--", "cat", "/proc/self/status", "/proc/self/mountinfo")
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line and "\t" in line)
    root = next(line for line in out.splitlines() if line.split()[4:5] == ["/"] and " - " in line)
    fields["RootMountOptions"] = root.split()[5]
    return {k: v.strip() for k, v in fields.items()}


def test_every_running_container_runs_as_10001_with_a_read_only_root_and_no_capabilities(cluster):
    seen = []
    for pod in pods():
        if component(pod) in ("fleet-init", "helm-test"):
            continue
        statuses = pod["status"].get("containerStatuses", []) + [
            s for s in pod["status"].get("initContainerStatuses", []) if "running" in s["state"]]
        for c in statuses:
            st = proc_status(pod["metadata"]["name"], c["name"])
            where = f"{pod['metadata']['name']}/{c['name']}"
            assert st["Uid"].split() == [str(UID)] * 4, where
            assert st["Gid"].split() == [str(GID)] * 4, where
            assert "ro" in st["RootMountOptions"].split(","), where
            for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(st[cap], 16) == 0, f"{where} {cap}={st[cap]}"
            assert st["NoNewPrivs"] == "1", where
            assert st["Seccomp"] == "2", where   # RuntimeDefault: a filter is installed
            seen.append(where)
    assert {s.split("/")[1] for s in seen} >= {"etcd", "island", "hsm-proxy", "frontend", "envoy", "noise-processor"}


def test_only_envoy_is_reachable_from_outside_the_frontend_pod(cluster):
    import httpx
    import socket

    pod = next(p for p in pods() if component(p) == "frontend")
    ip = pod["status"]["podIP"]
    with pytest.raises(OSError):   # the frontend binds the pod's loopback only
        socket.create_connection((ip, 8080), timeout=2).close()
    socket.create_connection((ip, 8443), timeout=5).close()   # Envoy's Noise listener
    ops = f"http://{ip}:9902"
    assert httpx.get(f"{ops}/readyz").status_code == 200
    # The ops listener routes no vault API.
    assert httpx.post(f"{ops}/v1/recover/start", json={}).status_code == 404


def test_service_dns_resolves_inside_the_cluster(cluster):
    island = next(p for p in pods() if component(p) == "island")["metadata"]["name"]
    out = node.kubectl("exec", island, "--", "python", "-c",
                       "import socket; print(socket.gethostbyname('bkv-etcd.bkv.svc.cluster.local'))")
    svc = node.kubectl_json("get", "service", "bkv-etcd")
    assert out.strip() == svc["spec"]["clusterIP"]


def test_the_cli_backs_up_and_restores_through_the_frontend_service_from_the_host(cluster, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "BKV_PASSWORD": "correct horse battery"}
    node.client(user=f"cli-{os.urandom(4).hex()}", env=env)
    src = tmp_path / "chats"
    src.mkdir()
    (src / "chat.db").write_bytes(os.urandom(4096))
    bkv = str(Path(sys.executable).with_name("bkv"))
    store = tmp_path / "store"

    def run(*args: str) -> dict:
        proc = procs.run([bkv, *args, "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    first = run("backup", str(src), "--store", str(store))
    assert first["new_key"] is True           # registered: K escrowed in the cluster's vault
    second = run("backup", str(src), "--store", str(store))
    assert second["new_key"] is False         # recovered K from the vault
    run("restore", "--store", str(store), "--dest", str(tmp_path / "restored"))
    assert (tmp_path / "restored" / "chat.db").read_bytes() == (src / "chat.db").read_bytes()


def test_helm_test_registers_and_recovers_a_throwaway_account(cluster):
    out = node.helm_test()
    assert "registered, recovered and deleted helm-test-" in out.get("logs", ""), out


async def test_a_deleted_pod_of_each_kind_comes_back_with_nothing_lost(cluster):
    user, password = f"pods-{os.urandom(4).hex()}", "pods password"
    key = await register(user, password)
    left = await wrong_guess(user)
    for kind in ("etcd", "hsm-proxy", "island", "frontend"):
        victim = next(p for p in pods() if component(p) == kind)
        uid = victim["metadata"]["uid"]
        node.kubectl("delete", "pod", victim["metadata"]["name"], "--wait=true", "--timeout=120s")
        deadline = time.monotonic() + 300
        while True:
            back = [p for p in pods() if component(p) == kind and p["metadata"]["uid"] != uid]
            problems = node.not_ready(f"{node.RELEASE}-fleet-init-{node.revision()}")
            if back and not problems:
                break
            assert time.monotonic() < deadline, f"{kind} did not come back: {problems}"
            await asyncio.sleep(2)
        took = await serving()
        print(f"{kind}: replaced, serving again {took:.1f} s after its replacement was Ready")
        # The record and its count survived: the next wrong guess spends exactly one more attempt.
        assert await wrong_guess(user) == left - 1, kind
        assert await recover(user, password) == key, kind
        # The right password reset the count (the vault's rule): spend one again for the next round.
        left = await wrong_guess(user)


async def test_helm_upgrade_with_a_changed_value_and_a_rebuilt_image_loses_no_record_or_count(cluster):
    user, password = f"upgrade-{os.urandom(4).hex()}", "upgrade password"
    key = await register(user, password)
    left = await wrong_guess(user)
    before = node.revision()
    # A rebuilt image: the same tree with a new label gives a new image id.
    tag = f"dev-{int(time.time())}"
    procs.run(["/usr/bin/docker", "build", "-q", "--network", "host", "--label", f"bkv.rebuild={tag}",
                    "--build-arg", "DEBIAN_IMAGE=bkv-base/debian:bookworm",
                    "--build-arg", "PYTHON_IMAGE=bkv-base/python:3.11",
                    "--secret", "id=ca,src=/etc/ssl/certs/ca-certificates.crt", "-t", f"bkv:{tag}", "."],
                   cwd=REPO, check=True, env={**os.environ, "DOCKER_BUILDKIT": "1"}, capture_output=True, timeout=1800)
    procs.run(["bash", str(REPO / "scripts" / "cluster-load.sh"), f"bkv:{tag}"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    node.install({"image": {"tag": tag}, "frontend": {"replicas": 2}})
    assert node.revision() == before + 1
    running = {c["image"] for p in pods() if component(p) in ("island", "frontend", "hsm-proxy")
               for c in p["spec"]["containers"]}
    assert running == {f"bkv:{tag}"}
    assert len([p for p in pods() if component(p) == "frontend"]) == 2
    await serving()
    # The attempt spent before the upgrade is still spent; the record is still there.
    assert await wrong_guess(user) == left - 1
    assert await recover(user, password) == key
    # Only the tag goes (its layers are bkv:dev's); the node's copy goes with cluster-down.
    procs.run(["/usr/bin/docker", "image", "rm", f"bkv:{tag}"], capture_output=True, timeout=120)


def hsm_proxy_logs(pod: str) -> str:
    """The hsm-proxy container's log, this run's and the one before (a container that exits is restarted)."""
    return "".join(node.kubectl("logs", pod, "-c", "hsm-proxy", *prev, check=False) for prev in ((), ("--previous",)))


def offline(*args: str) -> str:
    """The admin's offline steps (bkv-hsm-proxy sign-freeze, sign-members) on the host, with the dev admin key."""
    proc = procs.run([sys.executable, "-m", "bkv_hsm_proxy", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_a_lost_hsm_proxy_state_volume_is_refused_and_the_ceremony_through_kubectl_and_helm_brings_it_back(
        cluster, tmp_path):
    """docs/kubernetes.md, 'Replacing a lost state volume', at 2 of 2
    (values-node.yaml): the pod on a new, empty state volume refuses to
    serve; sign-freeze, freeze through kubectl exec, sign-members epoch 2,
    helm upgrade with the new hsm.memberSet and hsm.memberFreezes; every
    hsm-proxy serves in epoch 2 and the record's count and K survive."""
    from bkv_dev.admin import chart_members

    members = chart_members(node.RELEASE, 2)
    assert sorted(p["metadata"]["name"] for p in pods() if component(p) == "hsm-proxy") == members  # 2 of 2
    user, password = f"lost-{os.urandom(4).hex()}", "lost volume password"
    key = await register(user, password)
    left = await wrong_guess(user)

    # Site 1's state volume is lost: the pod and its PVC go, the StatefulSet makes both again (empty).
    sts, victim = f"{node.RELEASE}-hsm-proxy", members[1]
    node.kubectl("scale", "statefulset", sts, "--replicas=1")
    node.kubectl("wait", "--for=delete", f"pod/{victim}", "--timeout=120s", check=False)
    node.kubectl("delete", "pvc", f"state-{victim}", "--wait=true", "--timeout=120s")
    node.kubectl("scale", "statefulset", sts, "--replicas=2")
    deadline = time.monotonic() + 300
    while "made again after one was lost: replace the site with the member-set ceremony" not in hsm_proxy_logs(victim):
        assert time.monotonic() < deadline, f"{victim} did not refuse: {hsm_proxy_logs(victim)[-2000:]}"
        await asyncio.sleep(2)
    pod = node.kubectl_json("get", "pod", victim)
    assert not any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])

    # The ceremony: the admin's order (offline), the reachable member frozen through kubectl exec...
    admin = node.KUBEDIR / "admin" / "admin.key"
    order = tmp_path / "freeze.json"
    offline("sign-freeze", "--admin-key", str(admin), "--epoch", "1", "--out", str(order))
    frozen = tmp_path / "frozen-0.json"
    frozen.write_text(node.kubectl("exec", "-i", members[0], "-c", "hsm-proxy", "--", "bkv-hsm-proxy", "freeze",
                                   "--order", "-", "--hsm-url", "http://127.0.0.1:8100", input=order.read_text()))
    # ...the next set signed at its heads (offline), and helm upgrade with both: every hsm-proxy adopts it.
    new = tmp_path / "members-2.json"
    offline("sign-members", "--admin-key", str(admin), "--members", ",".join(members), "--epoch", "2",
            "--freezes", str(frozen), "--out", str(new))
    node.install({"hsm": {"memberSet": new.read_text(), "memberFreezes": [frozen.read_text()]}})

    for name in members:
        heads = json.loads(node.kubectl("exec", name, "-c", "hsm-proxy", "--", "python", "-c",
                                        "import urllib.request; print(urllib.request.urlopen("
                                        "'http://127.0.0.1:8100/hsm/v1/log/heads').read().decode())"))
        assert (heads["epoch"], heads["quorum"], heads["frozen"]) == (2, 2, False), name
    await serving()
    # The attempt spent before the loss is still spent; K comes back for the password.
    assert await wrong_guess(user) == left - 1
    assert await recover(user, password) == key
