"""The SDK's trust in fleets: two pinned roots, not fleet keys (docs/ota.md).

:class:`TrustStore` accepts a validation bundle only if both the operator
and the witness signed it and it is not older than the last one accepted,
and keeps that last good bundle in a cache file, so a restart cannot be
rolled back either. It uses a bundle only while it is fresh: before its
signed ``expires_at`` and at most ``max_age_s`` after its ``issued_at``
(default 7 days; the operator re-signs daily). So an attacker who withholds
newer bundles -- a forged 404, or an older validly signed bundle -- keeps a
client on old fleet keys for at most that long, never for a fleet's year.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from bkv_protocol import bundle as bd

log = logging.getLogger(__name__)

# The operator re-signs daily (bd.RESIGN_PERIOD_S): a week of slack covers a
# publishing outage over a long weekend and clock skew, while bounding how
# long a withheld rotation (after a fleet key compromise) can be hidden.
DEFAULT_MAX_AGE_S = 7 * 86400


class TrustStore:
    def __init__(self, operator_root: bytes, witness_root: bytes, cache_file: Path | None = None, *,
                 max_age_s: float = DEFAULT_MAX_AGE_S, clock: Callable[[], float] = time.time) -> None:
        if max_age_s <= 0:
            raise ValueError("the bundle maximum age must be positive")
        self._operator_root = operator_root
        self._witness_root = witness_root
        self._cache_file = cache_file
        self.max_age_s = max_age_s
        self._clock = clock
        self._current: bd.SignedBundle | None = None
        if cache_file is not None and cache_file.exists():
            text = cache_file.read_text()
            if _format_of(text) not in (None, bd.FORMAT_VERSION):
                # Cached by an older client (format 1 had no expiry): never usable now.
                log.warning("ignoring the cached validation bundle: format %s", _format_of(text))
                return
            cached = bd.SignedBundle.from_json(text)
            bd.verify(cached, operator_root, witness_root)  # a tampered cache is not trusted
            self._current = cached

    @property
    def current(self) -> bd.SignedBundle | None:
        return self._current

    def accept(self, text: str | bytes) -> bd.SignedBundle:
        """Verify and adopt a bundle; raises :class:`bkv_protocol.bundle.BundleError`
        and keeps the last good bundle if it is not acceptable. A newer bundle
        is adopted even if stale (it still raises the rollback floor); using
        it is what freshness gates (:meth:`require_fresh`)."""
        signed = bd.SignedBundle.from_json(text)
        floor = self._current.bundle.sequence if self._current else 0
        bd.verify(signed, self._operator_root, self._witness_root, min_sequence=floor)
        if self._current is None or signed.bundle.sequence > floor:
            self._current = signed
            self._save()
        return self._current

    def require_fresh(self, now: float | None = None) -> bd.SignedBundle:
        """The current bundle if it may be used at ``now``, else
        :class:`bkv_protocol.bundle.BundleStale` (or :class:`BundleError` if there is none)."""
        if self._current is None:
            raise bd.BundleError("no validation bundle has been accepted")
        bd.check_fresh(self._current.bundle, self.max_age_s, self._clock() if now is None else now)
        return self._current

    def fleet(self, fleet_id: str, now: float | None = None) -> bd.Fleet | None:
        """The fleet with this id if the current bundle is fresh and lists it as valid now."""
        return next((f for f in self.valid_fleets(now) if f.fleet_id == fleet_id), None)

    def valid_fleets(self, now: float | None = None) -> list[bd.Fleet]:
        """The fleets valid now in the current bundle; none if it is stale."""
        now = self._clock() if now is None else now
        try:
            current = self.require_fresh(now)
        except bd.BundleError:
            return []
        return [f for f in current.bundle.fleets if f.valid_at(now)]

    def _save(self) -> None:
        if self._cache_file is None:
            return
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cache_file.with_suffix(".tmp")
        tmp.write_text(self._current.to_json())
        os.replace(tmp, self._cache_file)  # atomic: never a half-written cache


def fetch_and_choose(edge_url: str, store: TrustStore, preferred_fleet: str | None = None,
                     timeout_s: float = 10.0) -> bd.Fleet:
    """Get the current bundle from the vault's edge (``GET /v1/bundle``, in
    clear: it is signed), adopt it if it verifies, and choose the fleet to use:
    ``preferred_fleet`` if valid, else the first valid one (the operator lists
    the fleet it wants used first). A bundle that does not verify, or is older
    than the cached one, is ignored and the cached bundle is used."""
    import httpx

    from bkv import errors
    from bkv_protocol.retry import Backoff, retry_sync

    def get(_: int) -> str:
        res = httpx.get(edge_url.rstrip("/") + "/v1/bundle", timeout=timeout_s)
        res.raise_for_status()
        return res.text

    why_not_newer = "the vault served the same bundle"
    try:
        text = retry_sync(get, retry_on=lambda e: isinstance(e, httpx.TransportError),
                          backoff=Backoff(deadline_s=timeout_s, first_delay_s=0.1, max_delay_s=1.0))
        store.accept(text)
    except bd.BundleError as exc:
        if store.current is None:
            raise errors.UntrustedFleet(f"the vault's validation bundle was refused: {exc}") from None
        log.warning("ignoring the served validation bundle (%s); using the cached one", exc)
        why_not_newer = f"the served bundle was refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - unreachable or no bundle: the cache may still do
        if store.current is None:
            raise errors.UntrustedFleet(f"no validation bundle could be fetched: {type(exc).__name__}") from None
        why_not_newer = f"none could be fetched ({_describe(exc)})"
    try:
        store.require_fresh()
    except bd.BundleStale as exc:
        raise errors.StaleBundle(
            f"{exc}: it has expired or is older than this client accepts (bundle_max_age_days = {store.max_age_s / 86400:g}), "
            f"and no newer one came from {edge_url} ({why_not_newer}). Nothing was sent. Check this device's "
            "network and clock and try again; if it goes on, something on the network may be withholding the "
            "vault's new fleet keys, or the operator has stopped re-signing bundles: tell the vault's operator "
            "(docs/ota.md, Freshness).") from None
    valid = store.valid_fleets()
    chosen = next((f for f in valid if f.fleet_id == preferred_fleet), valid[0] if valid else None)
    if chosen is None:
        raise errors.UntrustedFleet("the validation bundle lists no fleet valid now")
    return chosen


def _format_of(text: str) -> object:
    import json

    try:
        return json.loads(text)["bundle"]["format_version"]
    except (ValueError, KeyError, TypeError):
        return None  # from_json says what is wrong


def _describe(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"the vault answered {exc.response.status_code}"
    return type(exc).__name__
