"""Install, upgrade, test and use the chart on the local one-node cluster,
through Helm's own engine (helm-python-sdk) against .bkv-cluster/kubeconfig.

    python k8s/cluster/install.py install     # helm install or upgrade, then wait until every pod is Ready
    python k8s/cluster/install.py test        # helm test (register + recover a throwaway account)
    python k8s/cluster/install.py client      # `bkv dev cluster`: point the bkv CLI at the install
    python k8s/cluster/install.py uninstall

Values: the chart's values-dev.yaml, then k8s/cluster/values-node.yaml (local
images), then the dev token issuer (its public key for the frontend, its
private key for the helm test pod), then any --set-json KEY=JSON given; then,
unless those gave one, the hsm-proxies signed by the dev admin key (epoch 1).
The tests (tests/test_cluster.py) import this module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import helm_python as helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "backup-key-vault"
KUBEDIR = Path(os.environ.get("BKV_KUBEDIR", REPO / ".bkv-cluster"))
KUBECONFIG = KUBEDIR / "kubeconfig"
ISSUER_DIR = KUBEDIR / "issuer"
RELEASE = "bkv"
NAMESPACE = "bkv"
KUBECTL = os.environ.get("BKV_KUBECTL") or str(Path(os.environ.get("BKV_CLUSTER_CACHE", "/var/cache/bkv-cluster"))
                                               / "bin" / os.environ.get("K8S_VERSION", "v1.34.4") / "kubectl")


def kubectl(*args: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(KUBECONFIG), "-n", NAMESPACE, *args],
                          capture_output=True, text=True, input=input, timeout=300)
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json"))


def issuer_keys() -> tuple[str, str]:
    """(public PEM, private PEM) of the dev token issuer kept beside the kubeconfig."""
    from bkv_dev.issuer import DevIssuer

    DevIssuer.load_or_create(ISSUER_DIR)
    return (ISSUER_DIR / "issuer-public.pem").read_text(), (ISSUER_DIR / "issuer-key.pem").read_text()


def values(extra: dict | None = None) -> dict:
    merged: dict = {}
    for f in (CHART / "values-dev.yaml", REPO / "k8s" / "cluster" / "values-node.yaml"):
        _merge(merged, helm.values_from_yaml(f.read_text()))
    public, private = issuer_keys()
    _merge(merged, {"auth": {"tokenPublicKey": public}, "tests": {"issuerKey": private}})
    _merge(merged, extra or {})
    if not merged.get("hsm", {}).get("memberSet"):  # a changed set (the ceremony) comes in extra
        _merge(merged, {"hsm": {"memberSet": member_set(int(merged.get("hsm", {}).get("replicas", 3)))}})
    if not merged.get("hsm", {}).get("islandSet"):
        _merge(merged, {"hsm": {"islandSet": island_set(list(merged.get("islands") or ["island-a", "island-b"]))}})
    return merged


def island_set(islands: list[str]) -> str:
    """The install's first island set, signed by the dev admin key kept beside the kubeconfig (fixed the
    first time: islands added later come in through add-island's own sets)."""
    from bkv_dev.admin import first_island_set_file

    return first_island_set_file(KUBEDIR / "admin", islands).read_text()


def member_set(replicas: int) -> str:
    """The install's hsm-proxies signed by the dev admin key kept beside the kubeconfig."""
    from bkv_dev.admin import chart_members, member_set_file

    return member_set_file(KUBEDIR / "admin", chart_members(RELEASE, replicas)).read_text()


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def config() -> helm.Config:
    return helm.Config(kubeconfig_path=str(KUBECONFIG), namespace=NAMESPACE)


def installed() -> bool:
    with config() as cfg:
        try:
            cfg.status(RELEASE)
            return True
        except helm.HelmNotFoundError:
            return False


def install(extra: dict | None = None, timeout: int = 900) -> dict:
    """helm install (or upgrade when the release exists), then wait until the
    revision's fleet-init Job has completed and every pod is Ready."""
    vals = values(extra)
    with config() as cfg, helm.Chart.load(str(CHART)) as chart:
        if installed():
            rel = cfg.upgrade(chart, RELEASE, vals, namespace=NAMESPACE, timeout=timeout, wait="watcher")
        else:
            rel = cfg.install(chart, RELEASE, vals, namespace=NAMESPACE, create_namespace=True,
                              timeout=timeout, wait="watcher")
    wait_ready(timeout=timeout)
    return rel


def revision() -> int:
    with config() as cfg:
        return int(cfg.status(RELEASE)["revision"])


def wait_ready(timeout: float = 600) -> None:
    """The current revision's fleet-init Job Complete, every other pod Ready."""
    job = f"{RELEASE}-fleet-init-{revision()}"
    deadline = time.monotonic() + timeout
    while True:
        problems = not_ready(job)
        if not problems:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout:.0f} s: {problems}")
        time.sleep(2)


def not_ready(job: str) -> list[str]:
    problems = []
    j = json.loads(kubectl("get", "job", job, "-o", "json", check=False) or "{}")
    if not any(c.get("type") == "Complete" and c.get("status") == "True"
               for c in j.get("status", {}).get("conditions", [])):
        problems.append(f"job/{job} not complete")
    for pod in kubectl_json("get", "pods")["items"]:
        labels = pod["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/component") in ("fleet-init", "helm-test") or "job-name" in labels:
            continue
        if pod["metadata"].get("deletionTimestamp"):
            problems.append(f"{pod['metadata']['name']} terminating")
            continue
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        if not ready:
            problems.append(f"{pod['metadata']['name']} {pod['status'].get('phase')}")
    return problems


def helm_test(timeout: int = 300) -> dict:
    with config() as cfg:
        return cfg.test(RELEASE, timeout=timeout, logs=True)


def edge_url() -> str:
    """The frontend Service, reached from the host: its ClusterIP is routed
    onto the node's bridge, and kube-proxy sends it to Envoy in a pod."""
    svc = kubectl_json("get", "service", RELEASE)
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def fleet_configmap(path: Path) -> Path:
    path.write_text(kubectl("get", "configmap", f"{RELEASE}-fleet-public", "-o", "json"))
    return path


def client(user: str = "dev-user", env: dict | None = None) -> str:
    """`bkv dev cluster`: the CLI's client config pointed at this install."""
    cm = fleet_configmap(KUBEDIR / "fleet-public.json")
    bkv = Path(sys.executable).with_name("bkv")
    proc = subprocess.run([str(bkv), "dev", "cluster", "--edge-url", edge_url(), "--fleet-configmap", str(cm),
                           "--user", user, "--state-dir", str(KUBEDIR)], capture_output=True, text=True,
                          env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"bkv dev cluster: {proc.stdout}{proc.stderr}")
    return proc.stdout


def uninstall() -> None:
    with config() as cfg:
        cfg.uninstall(RELEASE, ignore_not_found=True, wait="watcher", timeout=300)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["install", "test", "client", "uninstall"])
    ap.add_argument("--set-json", action="append", default=[], metavar="KEY=JSON",
                    help="an extra value, e.g. maxAttempts=5 or frontend.replicas=2")
    args = ap.parse_args()
    extra: dict = {}
    for item in args.set_json:
        key, _, raw = item.partition("=")
        node = extra
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = json.loads(raw)
    if args.action == "install":
        rel = install(extra)
        print(f"installed {RELEASE} revision {rel.get('revision')} in namespace {NAMESPACE}: every pod Ready")
    elif args.action == "test":
        out = helm_test()
        print(out.get("logs", "").strip())
    elif args.action == "client":
        print(client().strip())
    else:
        uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
