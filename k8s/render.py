#!/usr/bin/env python3
"""``helm template`` without a helm binary: render the chart with Helm's own
engine (helm-python-sdk) and print the manifests, for kustomize or kubectl.

    python k8s/render.py --values charts/backup-key-vault/values-dev.yaml \\
        --set hsm.existingSecret=bkv-hsm-pins --set edge.existingSecret=bkv-edge-key \\
        --set-file auth.tokenPublicKey=issuer-public.pem \\
        --set-file hsm.memberSet=member-set.json --set-file hsm.islandSet=island-set.json \\
        > k8s/overlays/dev/rendered.yaml

Offline, Helm's ``lookup`` finds nothing, so secrets the chart would make are
new random ones on every render: for anything you apply more than once, make
the Secrets yourself and name them with ``existingSecret`` (README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parent.parent / "charts" / "backup-key-vault"


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def render(values_files: list[Path], sets: list[str], set_files: list[str], name: str, namespace: str,
           chart: Path = CHART) -> str:
    import helm_python as helm

    values: dict = {}
    for f in values_files:
        _merge(values, helm.values_from_yaml(f.read_text()))
    for item in sets:
        _merge(values, helm.parse_set_string(item))
    for item in set_files:
        key, _, path = item.partition("=")
        _merge(values, helm.parse_set_string(f"{key}=x"))
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = Path(path).read_text()
    with helm.Chart.load(str(chart)) as c:
        c.validate_schema(values)
        manifests = c.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt") or not manifests[path].strip():
            continue
        docs.append(f"# Source: {path}\n{manifests[path].strip()}\n")
    return "---\n".join(docs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", "-f", type=Path, action="append", default=[])
    ap.add_argument("--set", action="append", default=[], help="key=value, as helm --set")
    ap.add_argument("--set-file", action="append", default=[], help="key=path, as helm --set-file")
    ap.add_argument("--name", default="bkv")
    ap.add_argument("--namespace", default="bkv-dev")
    args = ap.parse_args(argv)
    sys.stdout.write(render(args.values, args.set, args.set_file, args.name, args.namespace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
