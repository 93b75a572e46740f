"""Publishing a validation bundle (the operator's side of docs/ota.md).

Build the bundle that extends the one in etcd, sign it with the operator
root key, have the witness countersign it, and only then store it in etcd,
where the frontend serves it (``GET /v1/bundle``).

The exact bundle is stored first as *pending* (``<prefix>/fleet/pending-bundle``)
before the witness sees it. The witness logs what it countersigns, so a run
that dies (or loses etcd) between the witness and the compare-and-swap must
not build another bundle at that sequence: the witness would refuse it as a
fork and publishing would be wedged for good. Every run therefore first
finishes a pending bundle -- the same bytes, which get the same
countersignature again -- and only then publishes what it was asked for.
A bundle the witness logged but etcd never got without a pending key (a run
from before pending bundles, or an etcd restored from a backup) is taken
from the witness log and published as it is, for the same reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bkv_protocol import bundle as bd
from bkv_protocol.encoding import b64d
from bkv_server.fleetmap import FLEET_BUNDLE_KEY, FLEET_PENDING_BUNDLE_KEY
from bkv_protocol.retry import Backoff, DeadlineExceeded, retry

log = logging.getLogger(__name__)

ROUNDS = 8  # compare-and-swap rounds lost to concurrent publishers before giving up


class PublishError(Exception):
    """What was asked for is not published; the message says why. A bundle
    already stored as pending stays there and the next run publishes it."""


@dataclass(frozen=True)
class Published:
    bundle: bd.SignedBundle  # the bundle now served
    # Sequences an earlier run left half-published (pending, or only in the witness log), published first.
    finished: tuple[int, ...] = ()


def fleet_entry(params_file: Path, edge_public_key: str, valid_days: float, now: int) -> bd.Fleet:
    params = json.loads(params_file.read_text())
    return bd.Fleet(params["fleet_id"], b64d(params["fleet_public_key"]), b64d(edge_public_key),
                    now - 300, now + int(valid_days * 86400))


def same_fleets(prev: bd.SignedBundle | None) -> list[bd.Fleet]:
    """Re-signing: the current bundle's fleets, windows and order unchanged."""
    if prev is None:
        raise PublishError("there is no published bundle to re-sign; publish one with publish-bundle first")
    return list(prev.bundle.fleets)


def _extends(pending: bd.SignedBundle, current: bd.SignedBundle | None) -> bool:
    if current is None:
        return pending.bundle.sequence == 1
    return pending.bundle.sequence == current.bundle.sequence + 1 and \
        pending.bundle.prev_hash == bd.bundle_hash(current.bundle)


def publish_bundle(etcd_endpoints: str, prefix: str, operator_key: bd.RootKey, witness_url: str,
                   fleets: list[bd.Fleet] | Callable[[bd.SignedBundle | None], list[bd.Fleet]],
                   now: int | None = None, valid_for_s: int = bd.DEFAULT_VALIDITY_S) -> Published:
    """Publish a bundle listing ``fleets`` (or ``fleets(current bundle)``),
    issued ``now`` and expiring ``valid_for_s`` later, after any pending one."""
    from bkv_server.etcd import connect

    now = int(time.time()) if now is None else now
    key = (prefix + FLEET_BUNDLE_KEY).encode()
    pending_key = (prefix + FLEET_PENDING_BUNDLE_KEY).encode()
    choose = fleets if callable(fleets) else (lambda _prev: list(fleets))

    async def countersign(http: httpx.AsyncClient, signed: bd.SignedBundle) -> bd.SignedBundle:
        async def ask(_: int) -> httpx.Response:
            return await http.post(witness_url.rstrip("/") + "/witness/v1/countersign",
                                   json={"bundle": signed.to_json()})

        try:
            res = await retry(ask, retry_on=lambda e: isinstance(e, httpx.TransportError),
                              backoff=Backoff(deadline_s=15.0, first_delay_s=0.2, max_delay_s=2.0))
        except (httpx.TransportError, DeadlineExceeded) as exc:
            raise PublishError(f"the witness could not be reached ({type(exc).__name__}); bundle "
                               f"{signed.bundle.sequence} stays pending and the next run publishes it") from None
        if res.status_code != 200:
            raise PublishError(f"the witness refused bundle {signed.bundle.sequence}: {res.text[:300]}; it stays "
                               f"pending (if it can never be countersigned, delete {pending_key.decode()} in etcd)")
        return signed.with_witness(b64d(res.json()["witness_signature"]))

    async def logged_successor(http: httpx.AsyncClient, current: bd.SignedBundle | None) -> bd.SignedBundle | None:
        """The bundle the witness already logged right after ``current``, if any."""
        try:
            res = await http.get(witness_url.rstrip("/") + "/witness/v1/log")
            res.raise_for_status()
            entries = res.json()["entries"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise PublishError(f"the witness log could not be read ({type(exc).__name__}); nothing published") \
                from None
        want = current.bundle.sequence + 1 if current is not None else 1
        if len(entries) < want:
            return None
        logged = bd.SignedBundle.from_json(entries[want - 1])
        if not _extends(logged, current):
            raise PublishError(f"the witness log and etcd disagree at bundle {want}: the logged one does not "
                               "extend the one etcd serves; compare them (GET /witness/v1/log) before publishing")
        bd.verify_operator(logged, operator_key.public)
        return logged

    async def go() -> Published:
        client = await connect(etcd_endpoints)
        tx = client.transactions
        finished: list[int] = []
        mine: bd.Bundle | None = None  # ours, once stored as pending
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                for _ in range(ROUNDS):
                    got, got_pending = await client.get(key), await client.get(pending_key)
                    current = bd.SignedBundle.from_json(got.value) if got is not None else None
                    if mine is not None and current is not None and current.bundle == mine:
                        return Published(current, tuple(finished))  # a concurrent run finished ours
                    same_current = [tx.mod(key) == got.mod_revision] if got is not None else [tx.version(key) == 0]
                    same_pending = [tx.mod(pending_key) == got_pending.mod_revision] if got_pending is not None \
                        else [tx.version(pending_key) == 0]
                    pending = bd.SignedBundle.from_json(got_pending.value) if got_pending is not None else None
                    logged = await logged_successor(http, current)
                    if logged is not None and (pending is None or pending.bundle != logged.bundle):
                        # Anything else at this sequence would be a fork: publish the logged one.
                        ok, _ = await client.transaction(
                            compare=same_current + same_pending,
                            success=[tx.put(key, logged.to_json().encode()), tx.delete(pending_key)], failure=[])
                        if ok:
                            log.warning("published bundle %d from the witness log", logged.bundle.sequence)
                            finished.append(logged.bundle.sequence)
                        continue
                    if pending is not None and _extends(pending, current):
                        out = await countersign(http, pending)
                        # Served and no longer pending, in one step, only if nothing moved meanwhile.
                        ok, _ = await client.transaction(
                            compare=same_current + same_pending,
                            success=[tx.put(key, out.to_json().encode()), tx.delete(pending_key)], failure=[])
                        if not ok:
                            continue
                        if mine is not None and out.bundle == mine:
                            return Published(out, tuple(finished))
                        log.warning("published bundle %d that an earlier run left pending", out.bundle.sequence)
                        finished.append(out.bundle.sequence)
                        continue
                    # Ours (if any) was superseded by another publisher: build it again on top.
                    # A pending bundle that does not extend the current one is left over from
                    # one already published (or from a restored etcd): replaced below.
                    issued = max(now, current.bundle.issued_at if current is not None else 0)
                    signed = bd.operator_sign(bd.next_bundle(current, choose(current), issued, valid_for_s),
                                              operator_key)
                    ok, _ = await client.transaction(
                        compare=same_current + same_pending,
                        success=[tx.put(pending_key, signed.to_json().encode())], failure=[])
                    if ok:
                        mine = signed.bundle
                raise PublishError("other publishers kept changing the bundle meanwhile; run again")
        finally:
            await client.close()

    return asyncio.run(go())


def current_bundle(etcd_endpoints: str, prefix: str) -> bd.SignedBundle | None:
    """The bundle etcd serves now, if any."""
    from bkv_server.etcd import connect

    async def go() -> bd.SignedBundle | None:
        client = await connect(etcd_endpoints)
        try:
            got = await client.get((prefix + FLEET_BUNDLE_KEY).encode())
            return bd.SignedBundle.from_json(got.value) if got is not None else None
        finally:
            await client.close()

    return asyncio.run(go())
