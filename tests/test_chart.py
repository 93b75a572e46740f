"""The Helm chart, proven without a cluster: Helm's own engine lints and
renders it (helm-python-sdk), every object validates against the Kubernetes
schemas (kubernetes-validate), `kubectl kustomize` renders the dev overlay,
static checks hold the security posture and the NetworkPolicies to their
promises, and a smoke run starts the rendered pods as local processes
(tests/support/chartrun.py) and registers and recovers a key through them."""

from __future__ import annotations

import base64
import csv
import copy
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import httpx
import kubernetes_validate
import pytest
import yaml
from support import procs

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "backup-key-vault"
KUBE_VERSION = "1.37.0"
# Custom resources have no schema in kubernetes-validate; they are checked by shape.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _issuer_pems() -> tuple[str, str]:
    """(public, private) PEM of a throwaway token issuer key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return (key.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


ISSUER_PEM, LOADTEST_ISSUER_PEM = _issuer_pems()
ADMIN_DIR = Path(tempfile.mkdtemp(prefix="bkv-chart-admin-"))


def _load_render():
    """k8s/render.py (a script, not a package): its values merge is the one the tests use too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bkv_k8s_render", ROOT / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_merge = _load_render()._merge


def values_for(name: str, **extra) -> dict:
    """A values file of the chart by name; "loadtest" is the dev values with the in-cluster load test on."""
    if name == "loadtest":
        return _merge(values_for("dev", loadtest={"enabled": True, "issuerKey": LOADTEST_ISSUER_PEM}), extra)
    values = {} if name == "default" else helm.values_from_yaml((CHART / f"values-{name}.yaml").read_text())
    values = _merge(_merge(values, {"auth": {"tokenPublicKey": ISSUER_PEM}}), extra)
    replicas = values.get("hsm", {}).get("replicas", 3)
    islands = values.get("islands") or ["island-a", "island-b"]
    return _merge(values, {"hsm": {"memberSet": values.get("hsm", {}).get("memberSet") or _member_set(replicas),
                                   "islandSet": values.get("hsm", {}).get("islandSet") or _island_set(islands)}})


def _island_set(islands: list[str]) -> str:
    """The install's islands signed by the throwaway admin key."""
    from bkv_dev.admin import island_set_file
    from bkv_protocol.islands import IslandSet

    return island_set_file(ADMIN_DIR, IslandSet.of(islands)).read_text()


def _member_set(replicas: int) -> str:
    """The hsm-proxies of release "bkv" signed by a throwaway admin key (one per test run)."""
    from bkv_dev.admin import chart_members, member_set_file

    return member_set_file(ADMIN_DIR, chart_members("bkv", replicas)).read_text()


def render(values: dict, namespace: str = "vault") -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name="bkv", namespace=namespace, is_install=True)


def objects(manifests: dict[str, str]) -> list[dict]:
    return [d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]


VALUE_SETS = ["default", "dev", "production", "loadtest"]


# -- lint, render, schema -----------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_chart_lints_clean_with_helms_own_engine(name):
    report = helm.lint(str(CHART), values_for(name), strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(name):
    objs = objects(render(values_for(name)))
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "Deployment", "Job", "Service", "NetworkPolicy", "PodDisruptionBudget",
            "ConfigMap", "Secret" if name != "production" else "ConfigMap"} <= kinds
    for o in objs:
        if o["kind"] in CRD_KINDS:
            assert o["apiVersion"] == "monitoring.coreos.com/v1"
            assert o["spec"]["endpoints"] if o["kind"] == "ServiceMonitor" else \
                {r["alert"] for g in o["spec"]["groups"] for r in g["rules"]} >= {"BkvIslandFailingClosed",
                                                                                 "BkvIslandLogStalled"}
            continue
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("bad, why", [
    ({"islands": ["Island_A"]}, "islands"),
    ({"etcd": {"replicas": 2}}, "replicas"),
    ({"maxAttempts": 0}, "maxAttempts"),
    ({"hsm": {"persistence": {"size": "lots", "accessModes": ["ReadWriteOnce"]}}}, "size"),
    ({"frontend": {"service": {"type": "ExternalName"}}}, "type"),
    ({"no_such_setting": True}, "no_such_setting"),
    ({"auth": {"tokenPublicKey": "not a key"}}, "tokenPublicKey"),
    ({"loadtest": {"scenario": "Everything"}}, "scenario"),
    ({"loadtest": {"runTime": "soon"}}, "runTime"),
])
def test_rendering_with_invalid_values_fails_on_the_schema(bad, why):
    values = values_for("dev")
    _merge(values, copy.deepcopy(bad))
    with pytest.raises(helm.HelmError) as exc:
        render(values)
    assert why in str(exc.value)


def test_rendering_without_a_signed_member_set_fails_with_a_clear_message():
    values = values_for("dev")
    values["hsm"]["memberSet"] = ""
    with pytest.raises(helm.HelmError, match="hsm.memberSet"):
        render(values)


def test_rendering_without_a_signed_island_set_fails_with_a_clear_message():
    values = values_for("dev")
    values["hsm"]["islandSet"] = ""
    with pytest.raises(helm.HelmError, match="hsm.islandSet"):
        render(values)


def test_fleet_init_stores_the_signed_island_set_mounted_beside_the_member_set():
    from bkv_protocol.islands import SignedIslandSet

    values = values_for("production")
    objs = objects(render(values))
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bkv-hsm-members")
    signed = SignedIslandSet.from_json(cm["data"]["island-set.json"])
    assert list(signed.set.islands) == sorted(values["islands"]) and signed.set.epoch == 1
    job = next(o for o in objs if o["kind"] == "Job")
    init = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fleet-init")
    assert init["command"][init["command"].index("--island-set") + 1] == "/etc/bkv-members/island-set.json"
    assert {"name": "members", "mountPath": "/etc/bkv-members", "readOnly": True} in init["volumeMounts"]


def _hsm_proxy(objs: list[dict]) -> tuple[dict, dict, dict]:
    """The hsm-proxy StatefulSet's pod template, its container and the member-set ConfigMap."""
    sts = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "bkv-hsm-proxy")
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bkv-hsm-members")
    return sts["spec"]["template"], sts["spec"]["template"]["spec"]["containers"][0], cm


def test_the_hsm_proxy_starts_through_start_with_the_member_set_and_etcd_and_no_freezes_at_first():
    template, container, cm = _hsm_proxy(objects(render(values_for("dev"))))
    # It waits for the fleet-init Job beside it on a new install, not fails at the first look.
    assert container["command"] == ["bkv-hsm-proxy", "start", "--hsm-id", "$(BKV_HSM_ID)", "--wait-for-fleet-init",
                                    "600", "--member-set", "/etc/bkv-members/member-set.json"]
    env = {e["name"]: e for e in container["env"]}
    assert env["BKV_HSM_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["BKV_HSM_ETCD_ENDPOINTS"]["value"] == "bkv-etcd:2379"  # as the islands reach it
    assert set(cm["data"]) == {"member-set.json", "island-set.json"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes[mounts["/etc/bkv-members"]]["configMap"]["name"] == "bkv-hsm-members"


def test_a_new_member_set_with_its_freezes_is_mounted_for_start_and_rolls_every_hsm_proxy():
    first = objects(render(values_for("dev")))
    freezes = ['{"hsm":"bkv-hsm-proxy-0"}', '{"hsm":"bkv-hsm-proxy-1"}']
    changed = values_for("dev", hsm={"memberSet": _member_set(2), "memberFreezes": freezes})
    template, container, cm = _hsm_proxy(objects(render(changed)))
    assert container["command"][-3:] == ["--freezes", "/etc/bkv-members/freeze-0.json",
                                         "/etc/bkv-members/freeze-1.json"]
    assert [cm["data"][f"freeze-{i}.json"] for i in (0, 1)] == freezes
    assert cm["data"]["member-set.json"] == changed["hsm"]["memberSet"]
    # The pod template changes with the set or a freeze, so helm upgrade restarts the hsm-proxies.
    key = "checksum/member-set"
    before = _hsm_proxy(first)[0]["metadata"]["annotations"][key]
    assert template["metadata"]["annotations"][key] != before
    again = values_for("dev", hsm={"memberSet": _member_set(2), "memberFreezes": freezes[:1]})
    assert _hsm_proxy(objects(render(again)))[0]["metadata"]["annotations"][key] not in (before, template[
        "metadata"]["annotations"][key])
    assert _hsm_proxy(objects(render(values_for("dev"))))[0]["metadata"]["annotations"][key] == before


def test_rendering_without_the_token_issuer_key_fails_with_a_clear_message():
    values = values_for("dev")
    values["auth"]["tokenPublicKey"] = ""
    with pytest.raises(helm.HelmError, match="auth.tokenPublicKey"):
        render(values)


def test_the_values_shape_the_fleet_one_statefulset_per_island_and_the_etcd_cluster():
    objs = objects(render(values_for("production")))
    sts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "StatefulSet"}
    assert set(sts) == {"bkv-etcd", "bkv-hsm-proxy", "bkv-island-a", "bkv-island-b", "bkv-island-c"}
    assert all(sts[f"bkv-island-{x}"]["spec"]["replicas"] == 3 for x in "abc")
    # Five hsm-proxies, each named, each with a state volume of its own; every island asks each of them.
    hsm = sts["bkv-hsm-proxy"]
    assert hsm["spec"]["replicas"] == 5 and hsm["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    env = {e["name"]: e for e in hsm["spec"]["template"]["spec"]["containers"][0]["env"]}
    # The member set the admin key signed is what fleet-init fixes and each state file names; fleet-init
    # checks it names exactly the hsm-proxies this install runs.
    members = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bkv-hsm-members")
    assert json.loads(members["data"]["member-set.json"])["members"] == [f"bkv-hsm-proxy-{i}" for i in range(5)]
    job = next(o for o in objs if o["kind"] == "Job")
    init = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fleet-init")
    assert init["command"][init["command"].index("--hsm-members") + 1] == ",".join(f"bkv-hsm-proxy-{i}" for i in range(5))
    assert env["BKV_HSM_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    island_env = {e["name"]: e.get("value") for e in sts["bkv-island-a"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert island_env["BKV_ISLAND_HSM_URLS"].split(",") == [
        f"http://bkv-hsm-proxy-{i}.bkv-hsm-proxy-pods:8100" for i in range(5)]
    etcd = sts["bkv-etcd"]
    assert etcd["spec"]["replicas"] == 5
    cluster = next(a for a in etcd["spec"]["template"]["spec"]["containers"][0]["args"]
                   if a.startswith("--initial-cluster="))
    assert cluster.count("=http://") == 5 and "bkv-etcd-4.bkv-etcd-peers.vault.svc.cluster.local:2380" in cluster
    pdb = next(o for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "bkv-etcd")
    assert pdb["spec"]["minAvailable"] == 3  # quorum of five
    dev = {o["metadata"]["name"]: o for o in objects(render(values_for("dev"))) if o["kind"] == "StatefulSet"}
    assert dev["bkv-etcd"]["spec"]["replicas"] == 1
    for o in sts.values():
        spread = o["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


# -- security posture ---------------------------------------------------------------------

def test_the_load_test_without_the_issuer_key_or_with_too_few_accounts_fails_with_a_clear_message():
    with pytest.raises(helm.HelmError, match="loadtest.issuerKeySecret or loadtest.issuerKey"):
        render(values_for("dev", loadtest={"enabled": True}))
    assert not [o for o in objects(render(values_for("dev"))) if "locust" in o["metadata"]["name"]]
    with pytest.raises(helm.HelmError, match="loadtest.users must not exceed loadtest.seedUsers"):
        render(values_for("loadtest", loadtest={"users": 50, "seedUsers": 10}))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_pod_meets_the_restricted_security_standard(name):
    for where, spec in pod_specs(objects(render(values_for(name)))):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], (where, c["name"])
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", (where, c["name"])


def test_the_helm_test_pod_registers_and_recovers_through_the_public_service_as_a_restricted_pod():
    objs = objects(render(values_for("dev", tests={"enabled": True, "issuerKey": LOADTEST_ISSUER_PEM})))
    pod = next(o for o in objs if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "bkv_dev.helmtest"]
    env = {e["name"]: e for e in c["env"]}
    assert env["BKV_TEST_EDGE_URL"]["value"] == "http://bkv.vault.svc.cluster.local:443"
    assert env["BKV_TEST_FLEET_KEY"]["valueFrom"]["configMapKeyRef"]["name"] == "bkv-fleet-public"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "bkv-test-issuer")
    assert "helm.sh/hook" not in (secret["metadata"].get("annotations") or {})  # helm test --logs reads pods only
    # Off by default; on without the issuer key, a clear error.
    assert not any(o["kind"] == "Pod" for o in objects(render(values_for("dev"))))
    with pytest.raises(helm.HelmError, match="tests.issuerKeySecret or tests.issuerKey"):
        render(values_for("dev", tests={"enabled": True}))


def test_the_chart_readme_lists_every_value_with_its_default():
    """charts/backup-key-vault/README.md has a row per value of values.yaml, with the same default."""
    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            # Maps handed to Kubernetes whole (resources, selectors, labels) are one value.
            if isinstance(v, dict) and v and not key.endswith(("resources", "Resources", "Selector", "labels")):
                yield from leaves(v, key)
            else:
                yield key, v

    rows = {}
    for line in (CHART / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (json.loads(cells[1].strip("`")), cells[2])
    values = dict(leaves(yaml.safe_load((CHART / "values.yaml").read_text())))
    assert set(rows) == set(values), (set(values) ^ set(rows))
    for key, default in values.items():
        assert rows[key][0] == default, key
        assert len(rows[key][1]) >= 8, f"{key}: say what it means"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_pod_gets_service_link_env_vars_that_would_override_its_settings(name):
    # Found on a real node: the Service bkv-frontend-metrics made Kubernetes set
    # BKV_FRONTEND_METRICS_PORT=tcp://..., which the frontend read as its port.
    for where, spec in pod_specs(objects(render(values_for(name)))):
        assert spec.get("enableServiceLinks") is False, where


def test_every_long_running_container_has_probes_and_resources():
    for where, spec in pod_specs(objects(render(values_for("default")))):
        if where.startswith("Job/"):
            continue
        long_running = spec["containers"] + [c for c in spec.get("initContainers", [])
                                             if c.get("restartPolicy") == "Always"]
        for c in long_running:
            assert c.get("readinessProbe") or c.get("livenessProbe") or c.get("startupProbe"), (where, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (where, c["name"])


def test_only_the_fleet_init_job_gets_api_credentials_and_only_for_its_configmap():
    objs = objects(render(values_for("default")))
    for where, spec in pod_specs(objs):
        assert spec.get("automountServiceAccountToken") is False, where
    role = next(o for o in objs if o["kind"] == "Role")
    named = [r for r in role["rules"] if "get" in r["verbs"] or "update" in r["verbs"]]
    assert named and all(r["resourceNames"] == ["bkv-fleet-public"] for r in named)
    assert {v for r in role["rules"] for v in r["verbs"]} <= {"get", "update", "create"}


def test_the_frontend_listens_on_loopback_and_only_envoy_has_a_public_port():
    objs = objects(render(values_for("default")))
    deploy = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "bkv-frontend")
    spec = deploy["spec"]["template"]["spec"]
    frontend = next(c for c in spec["containers"] if c["name"] == "frontend")
    env = {e["name"]: e.get("value") for e in frontend["env"]}
    assert env["BKV_FRONTEND_HOST"] == "127.0.0.1" and "ports" not in frontend
    sidecars = {c["name"]: c for c in spec["initContainers"] if c.get("restartPolicy") == "Always"}
    assert set(sidecars) == {"noise-processor", "envoy"}  # native sidecars
    assert "127.0.0.1:9002" in sidecars["noise-processor"]["command"]
    public = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "bkv")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["noise"]


def test_secrets_that_guard_records_are_kept_on_uninstall():
    objs = objects(render(values_for("dev")))
    kept = {o["metadata"]["name"] for o in objs
            if (o["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"}
    assert {"bkv-hsm-pins", "bkv-edge-key", "bkv-hsm-token"} <= kept
    pins = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "bkv-hsm-pins")
    assert all(len(base64.b64decode(v)) >= 32 for v in pins["data"].values())


# -- NetworkPolicies: a small evaluator of what the rendered policies allow ---------------

def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _allowed(policies: list[dict], dst: dict, src: dict | None, port: int, src_ns_labels: dict) -> bool:
    """Kubernetes semantics for ingress: a pod selected by any policy accepts
    only what some rule of those policies allows. ``src`` None: outside."""
    mine = [p for p in policies if _selects(p["spec"]["podSelector"], dst)]
    if not mine:
        return True
    for p in mine:
        for rule in p["spec"].get("ingress", []):
            ports = [x["port"] for x in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "podSelector" in peer and src is not None and src_ns_labels.get("self") and \
                        _selects(peer["podSelector"], src):
                    return True
                if "namespaceSelector" in peer and _selects(peer["namespaceSelector"], src_ns_labels):
                    return True
    return False


def _pod_labels_by_component(objs: list[dict]) -> dict[str, dict]:
    return {o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
            o["spec"]["template"]["metadata"]["labels"] for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")}


def test_network_policies_let_only_islands_reach_the_hsm_and_only_the_frontend_reach_islands():
    objs = objects(render(values_for("default")))
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = _pod_labels_by_component(objs)
    same_ns = {"self": True, "kubernetes.io/metadata.name": "vault"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    allowed = lambda dst, src, port, ns=same_ns: _allowed(policies, pods[dst], pods.get(src), port, ns)  # noqa: E731

    assert allowed("hsm-proxy", "island", 8100)
    for other in ("frontend", "etcd", "fleet-init", None):
        assert not allowed("hsm-proxy", other, 8100), other
    assert allowed("island", "frontend", 8200)
    for other in ("hsm-proxy", "etcd", "fleet-init", "island", None):
        assert not allowed("island", other, 8200), other
    # The hsm-proxy reads the log chain from etcd when it adopts a new member set (start).
    for src in ("island", "frontend", "fleet-init", "hsm-proxy"):
        assert allowed("etcd", src, 2379), src
    assert not allowed("etcd", None, 2379) and not allowed("etcd", "hsm-proxy", 2380)
    assert allowed("etcd", "etcd", 2380) and not allowed("etcd", "island", 2380)
    assert _allowed(policies, pods["frontend"], None, 8443, {})  # the public Noise port
    assert not _allowed(policies, pods["frontend"], None, 9902, {})
    # Prometheus (in the monitoring namespace) reaches metrics ports only, never an API port.
    for dst, metrics_port, api_port in (("hsm-proxy", 9100, 8100), ("island", 9200, 8200), ("etcd", 2381, 2379)):
        assert _allowed(policies, pods[dst], {}, metrics_port, monitoring), dst
        assert not _allowed(policies, pods[dst], {}, api_port, monitoring), dst


def test_with_the_load_test_locust_workers_reach_only_their_master_and_the_public_edge():
    objs = objects(render(values_for("loadtest")))
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = _pod_labels_by_component(objs)
    ns = {"self": True, "kubernetes.io/metadata.name": "vault"}
    assert _allowed(policies, pods["locust-master"], pods["locust-worker"], 5557, ns)
    assert not _allowed(policies, pods["locust-master"], pods["frontend"], 5557, ns)
    assert _allowed(policies, pods["frontend"], pods["locust-worker"], 8443, ns)
    for dst, port in (("island", 8200), ("hsm-proxy", 8100), ("etcd", 2379)):
        assert not _allowed(policies, pods[dst], pods["locust-worker"], port, ns), dst
        assert not _allowed(policies, pods[dst], pods["locust-master"], port, ns), dst


# -- dashboards, kustomize, Dockerfile -----------------------------------------------------

def test_dashboards_render_as_configmaps_labelled_for_the_grafana_sidecar():
    objs = objects(render(values_for("default")))
    boards = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("bkv-dashboard-")]
    assert {o["metadata"]["name"].removeprefix("bkv-dashboard-") for o in boards} == \
        {"fleet-overview", "islands", "hsm", "etcd", "security"}
    for o in boards:
        assert o["metadata"]["labels"]["grafana_dashboard"] == "1"
        (board,) = [json.loads(v) for v in o["data"].values()]
        assert board["panels"] and all(t["expr"] for p in board["panels"] for t in p["targets"])
        text = json.dumps(board)
        assert "user_id" not in text and "user=" not in text  # no per-user series anywhere


def test_kubectl_kustomize_renders_the_dev_overlay(tmp_path):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed for `kubectl kustomize` (scripts/setup.sh says how to get it)"
    overlay = tmp_path / "overlays" / "dev"
    shutil.copytree(ROOT / "k8s" / "overlays" / "dev", overlay)
    pem = tmp_path / "issuer.pem"
    pem.write_text(ISSUER_PEM)
    member_set = tmp_path / "member-set.json"
    member_set.write_text(_member_set(1))
    island_set = tmp_path / "island-set.json"
    island_set.write_text(_island_set(["island-a", "island-b"]))
    rendered = procs.run([sys.executable, str(ROOT / "k8s" / "render.py"), "-f",
                               str(CHART / "values-dev.yaml"), "--set", "hsm.existingSecret=bkv-hsm-pins",
                               "--set", "edge.existingSecret=bkv-edge-key",
                               "--set-file", f"auth.tokenPublicKey={pem}", "--set-file", f"hsm.memberSet={member_set}",
                               "--set-file", f"hsm.islandSet={island_set}"],
                              capture_output=True, text=True, check=True).stdout
    (overlay / "rendered.yaml").write_text(rendered)
    out = procs.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"bkv-dev"}
    # existingSecret: the overlay carries no generated secret to overwrite the real ones with.
    assert not [o for o in objs if o["kind"] == "Secret"]
    for o in objs:
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)


def test_the_dockerfile_is_multi_stage_pinned_slim_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    assert base.startswith("python:3.11.") and base.endswith("-slim-bookworm") and base.count(".") >= 2
    froms = [line.split()[1:] for line in text.splitlines() if line.startswith("FROM ")]
    assert [f[-1] for f in froms] == ["noise-processor", "build", "runtime", "loadtest", "runtime"]
    assert "COPY --from=build" in text
    # The Go processor is built by the same script as the local fleet's, and lands on the image's PATH.
    go_stage = text.split("AS noise-processor", 1)[1].split("\nFROM ", 1)[0]
    assert "RUN bash scripts/build-noise-processor.sh /out/bkv-noise-processor" in go_stage
    binaries = {line.split()[-1].rsplit("/", 1)[1] for line in text.splitlines()
                if line.startswith("COPY --from=") and " /opt/bkv/bin/" in line}
    assert binaries == {"bkv-noise-processor"}
    # A plain `docker build` gives the service image (the last stage is the runtime one).
    assert froms[-1] == ["runtime"]
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    loadtest_stage = text.split("AS loadtest", 1)[1].split("\nFROM ", 1)[0]
    assert "COPY loadtest /opt/bkv-loadtest" in loadtest_stage and "USER 10001:10001" in loadtest_stage
    assert "loadtest" not in (ROOT / ".dockerignore").read_text().split()
    # Every entrypoint the chart runs from our image is a console script the image installs.
    scripts = set(__import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    loadtest = {"enabled": True, "issuerKey": "-----BEGIN PRIVATE KEY-----\nx\n"}
    for where, spec in pod_specs(objects(render(values_for("default", loadtest=loadtest)))):
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].endswith("-loadtest"):  # the loadtest target: Locust, and python on loadtest/
                assert c["command"][0] in ("locust", "python"), (where, c["name"])
                assert all((ROOT / "loadtest" / Path(a).name).exists()
                           for a in c["command"] + c.get("args", []) if a.startswith("/opt/bkv-loadtest/"))
            elif c["image"].startswith("ghcr.io/backup-key-vault/"):
                assert c["command"][0] in scripts | binaries | {"sh"}, (where, c["name"], c["command"][0])


# -- smoke run: the rendered pods as local processes ---------------------------------------

# What the real one-node Kubernetes of tests/test_cluster.py shows (it runs with
# BKV_CLUSTER_TESTS=1) is not run again as processes; the smoke run keeps only
# what the node does not exercise (the Locust Jobs) when the node runs.
on_real_node = pytest.mark.skipif(os.environ.get("BKV_CLUSTER_TESTS") == "1",
                                  reason="shown on the real node by tests/test_cluster.py")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="network namespaces need root and iproute2")


@pytest.fixture(scope="module")
def chart_fleet(tmp_path_factory):
    from support.chartrun import ChartRun

    from bkv_dev.issuer import DevIssuer

    work = tmp_path_factory.mktemp("chartrun")
    issuer = DevIssuer.load_or_create(work / "issuer")
    values = values_for("dev", auth={"tokenPublicKey": (work / "issuer" / "issuer-public.pem").read_text()},
                        # The in-cluster load test, short: started by its own test below.
                        loadtest={"enabled": True, "issuerKey": (work / "issuer" / "issuer-key.pem").read_text(),
                                  "seedUsers": 4, "workers": 2, "users": 2, "spawnRate": 2, "runTime": "6s"})
    run = ChartRun(render(values), work / "run", "vault")
    try:
        run.up(["bkv-etcd", "bkv-fleet-init", "bkv-hsm-proxy", "bkv-island", "bkv-frontend"])
        yield run, issuer
    finally:
        run.down()


@needs_root
@on_real_node
async def test_the_rendered_chart_runs_and_a_key_is_registered_and_recovered_through_it(chart_fleet):
    from bkv.sdk import VaultClient
    from bkv.transport import AsyncNoiseTransport
    from bkv_protocol.encoding import b64d
    from bkv_protocol.secrets import BackupKey
    from bkv_protocol.noise import StaticKey

    run, issuer = chart_fleet
    # The fleet-init Job published the keys clients pin, through the API with its own token.
    published = run.api.configmaps[("vault", "bkv-fleet-public")]["data"]
    params = json.loads(published["fleet-params.json"])
    assert params["fleet_id"] == published["fleet_id"] and "opaque_setup" not in json.dumps(params)
    assert params["key_attributes"] and params["max_attempts"] == 10
    (frontend,) = run.pods_of("bkv-frontend")
    edge_url = f"http://{frontend.ip}:8443"

    async def client(user: str) -> VaultClient:
        device = StaticKey.generate()
        token = issuer.mint(user, device_key_b64=base64.b64encode(device.public).decode())
        transport = AsyncNoiseTransport(edge_url, b64d(published["edge_public_key"]), device)
        return VaultClient(edge_url, b64d(published["fleet_public_key"]), user, token, transport=transport)

    key = BackupKey(os.urandom(32))
    async with await client("chart-user") as phone:
        info = await phone.fleet()
        assert info.fleet_public_key == b64d(published["fleet_public_key"])
        assert info.edge_public_key == published["edge_public_key"]
        await phone.register(key, "correct horse")
    async with await client("chart-user") as new_phone:
        recovered = await new_phone.recover("correct horse")
    assert recovered.key.reveal() == key.reveal()


@needs_root
@on_real_node
def test_in_the_rendered_chart_only_envoy_is_reachable_from_outside_the_frontend_pod(chart_fleet):
    run, _ = chart_fleet
    (frontend,) = run.pods_of("bkv-frontend")
    with pytest.raises(OSError):
        socket.create_connection((frontend.ip, 8080), timeout=2).close()
    ops = f"http://{frontend.ip}:9902"
    assert httpx.get(f"{ops}/readyz").status_code == 200
    assert "bkv_http_requests_total" in httpx.get(f"{ops}/metrics").text
    assert "envoy_" in httpx.get(f"{ops}/stats/prometheus").text
    # The ops listener routes no vault API, plain or otherwise.
    assert httpx.post(f"{ops}/v1/recover/start", json={}).status_code == 404
    assert httpx.get(f"{ops}/v1/fleet").status_code == 404
    (hsm,) = run.pods_of("bkv-hsm-proxy")
    assert "bkv_hsm_operation_duration_seconds" in httpx.get(f"http://{hsm.ip}:9100/metrics").text
    assert ipaddress.ip_address(frontend.ip) in run.net


@needs_root
@on_real_node
def test_the_bkv_cli_backs_up_and_restores_through_the_rendered_chart(chart_fleet, tmp_path):
    """The README's cluster path: `bkv dev cluster` reads the published
    ConfigMap, then `bkv backup` and `bkv restore` work through Envoy."""
    run, _ = chart_fleet
    (frontend,) = run.pods_of("bkv-frontend")
    configmap = tmp_path / "fleet-public.json"
    configmap.write_text(json.dumps(run.api.configmaps[("vault", "bkv-fleet-public")]))
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "BKV_PASSWORD": "chart password"}
    bkv = [str(Path(sys.executable).with_name("bkv"))]
    state = str(run.workdir.parent)  # the fixture's dev issuer lives in <state>/issuer

    def cli(*args: str) -> subprocess.CompletedProcess:
        return procs.run(bkv + list(args), env=env, capture_output=True, text=True, timeout=120)

    res = cli("dev", "cluster", "--edge-url", f"http://{frontend.ip}:8443", "--fleet-configmap", str(configmap),
              "--user", "chart-cli-user", "--state-dir", state)
    assert res.returncode == 0, res.stderr
    src = tmp_path / "chats"
    src.mkdir()
    (src / "chat.txt").write_bytes(os.urandom(4096))
    assert (res := cli("backup", str(src), "--store", str(tmp_path / "store"))).returncode == 0, res.stderr
    res = cli("restore", "--store", str(tmp_path / "store"), "--dest", str(tmp_path / "restored"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "restored" / "chat.txt").read_bytes() == (src / "chat.txt").read_bytes()


@needs_root
def test_the_charts_locust_jobs_seed_accounts_and_load_the_fleet_through_noise(chart_fleet):
    """values loadtest.*: the master's init container registers the accounts
    through the public Service, two workers join the master, the headless run
    recovers keys with no failure and leaves Locust's reports."""
    run, _ = chart_fleet
    run.up(["bkv-locust"])  # both Jobs at once (the master waits for its workers); finished when up returns
    (master,) = run.pods_of("bkv-locust-master")
    assert len(run.pods_of("bkv-locust-worker")) == 2
    assert "seeded 4 accounts" in run.log(master, "seed")
    with open(master.dirs["reports"] / "locust_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["recovery"]["Request Count"]) > 0 and rows["recovery"]["Failure Count"] == "0"
    assert (master.dirs["reports"] / "locust.html").exists()
