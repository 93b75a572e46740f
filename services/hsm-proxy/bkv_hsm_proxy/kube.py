"""Publishing the public fleet parameters as a Kubernetes ConfigMap.

The fleet-init Job runs this after ``fleet-init``: operators (and NOTES.txt)
read the fleet public key from the ConfigMap. It talks to the API server with
the Job's own service-account token (a Role allows only this ConfigMap), so
the image needs no kubectl. Only public values are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from bkv_protocol.retry import Backoff, retry_sync

PUBLIC_FIELDS = ("fleet_id", "fleet_public_key", "max_attempts", "opaque_suite", "signature_alg",
                 "key_attributes", "token")


class PublishError(Exception):
    """The ConfigMap could not be written; the message says why."""


def publish_configmap(params_file: Path, name: str, *, edge_public_key_file: Path | None,
                      serviceaccount_dir: Path, deadline_s: float = 60.0) -> dict:
    params = json.loads(params_file.read_text())
    data = {"fleet-params.json": json.dumps({k: params[k] for k in PUBLIC_FIELDS if k in params}, indent=2),
            "fleet_id": params["fleet_id"], "fleet_public_key": params["fleet_public_key"]}
    if edge_public_key_file is not None:
        data["edge_public_key"] = edge_public_key_file.read_text().strip()
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise PublishError("KUBERNETES_SERVICE_HOST is not set: this runs inside a Kubernetes pod")
    namespace = (serviceaccount_dir / "namespace").read_text().strip()
    token = (serviceaccount_dir / "token").read_text().strip()
    base = f"https://{host}:{port}/api/v1/namespaces/{namespace}/configmaps"
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "backup-key-vault",
                                                  "app.kubernetes.io/component": "fleet-public"}},
            "data": data}

    def attempt(_: int) -> dict:
        with httpx.Client(verify=str(serviceaccount_dir / "ca.crt"), timeout=10.0,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            res = http.put(f"{base}/{name}", json=body)
            if res.status_code == 404:
                res = http.post(base, json=body)
            if res.status_code >= 400:
                raise PublishError(f"the API server answered {res.status_code} for ConfigMap {name}")
            return data

    # The API server may be briefly unreachable while the pod's network comes up.
    return retry_sync(attempt, retry_on=lambda e: isinstance(e, httpx.TransportError),
                      backoff=Backoff(deadline_s=deadline_s, first_delay_s=0.2, max_delay_s=2.0))
