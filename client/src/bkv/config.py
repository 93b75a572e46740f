"""The client config, ``$XDG_CONFIG_HOME/bkv/config.toml``.

It holds the vault address, what the client trusts -- either the two root
keys of validation bundles (docs/ota.md) or, older style, one pinned fleet
public key -- and the identity (user id and account token). The token is a credential, so the file is
written with mode 0600. Beside it, ``escrowed.json`` remembers which accounts this
device has seen an escrowed key for (see :class:`EscrowMarks`); nothing else about
the user ever lands on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from bkv_protocol.encoding import b64d, fleet_id_for


class ConfigError(Exception):
    pass


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bkv" / "config.toml"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    fleet_public_key: str  # base64 DER, pinned; "" when the bundle roots are pinned instead
    user_id: str
    token: str
    dev_state_dir: str | None = None
    # The Noise edge (the default path): its address and pinned public key, and
    # this device's static key (a device identity, like an SSH key: mode 0600).
    edge_url: str | None = None
    edge_public_key: str | None = None
    device_key: str | None = None
    transport: str = "noise"  # or "plaintext", only against a dev fleet started with --plaintext
    # Over-the-air fleet keys: pin the bundle roots; the fleet and edge keys
    # then come from the verified bundle (cached next to this file).
    operator_root: str | None = None
    witness_root: str | None = None
    # A cached bundle older than this is not used (docs/ota.md, Freshness).
    bundle_max_age_days: float = 7.0

    def __repr__(self) -> str:
        return f"ClientConfig(url={self.url!r}, user_id={self.user_id!r}, token=(redacted))"

    @property
    def fleet_key_der(self) -> bytes:
        return b64d(self.fleet_public_key)

    @property
    def fleet_id(self) -> str:
        return fleet_id_for(self.fleet_key_der)

    def client(self, *, clock=None, **kwargs):
        """``clock`` (unix seconds) is what the bundle freshness check reads; tests inject one."""
        from bkv.sdk import VaultClient

        if self.transport == "plaintext":
            return VaultClient(self.url, self.fleet_key_der, self.user_id, self.token, **kwargs)
        from bkv.transport import AsyncNoiseTransport
        from bkv_protocol.noise import StaticKey

        fleet_key, edge_key = self.trusted_keys(clock)
        if not (self.edge_url and edge_key and self.device_key):
            raise ConfigError("the config has no Noise edge (edge_url, edge_public_key, device_key); "
                              "set transport = \"plaintext\" only for a dev fleet run with --plaintext")
        transport = AsyncNoiseTransport(self.edge_url, edge_key, StaticKey(b64d(self.device_key)))
        return VaultClient(self.edge_url, fleet_key, self.user_id, self.token, transport=transport, **kwargs)

    def trusted_keys(self, clock=None) -> tuple[bytes, bytes | None]:
        """(fleet public key DER, edge public key): from a verified validation
        bundle if the config pins roots, else the pinned values."""
        if self.operator_root and self.witness_root:
            import time

            from bkv.trust import TrustStore, fetch_and_choose

            store = TrustStore(b64d(self.operator_root), b64d(self.witness_root), self.bundle_cache(),
                               max_age_s=self.bundle_max_age_days * 86400, clock=clock or time.time)
            fleet = fetch_and_choose(self.edge_url or self.url, store, self.fleet_id if self.fleet_public_key else None)
            return fleet.fleet_public_key, fleet.edge_public_key
        return self.fleet_key_der, b64d(self.edge_public_key) if self.edge_public_key else None

    def bundle_cache(self) -> Path:
        """The last good bundle for *these* roots, beside the config: a
        config pointed at another vault (a dev fleet made again, a cluster)
        never meets a cache it cannot verify, while a cache of these roots
        that does not verify is still refused (trust.TrustStore). A cache
        from before the name carried the roots (``bundle.json``) is adopted
        if it verifies under them, so its rollback floor is kept."""
        roots = hashlib.sha256(f"{self.operator_root}|{self.witness_root}".encode()).hexdigest()[:16]
        path = config_path().with_name(f"bundle-{roots}.json")
        legacy = path.with_name("bundle.json")
        if not path.exists() and legacy.exists():
            from bkv_protocol import bundle as bd

            try:
                bd.verify(bd.SignedBundle.from_json(legacy.read_text()), b64d(self.operator_root),
                          b64d(self.witness_root))
            except (bd.BundleError, ValueError):
                pass  # another vault's, or unreadable: not these roots' floor
            else:
                os.replace(legacy, path)
        return path

    @property
    def vault_anchor(self) -> str:
        """Names the vault this config trusts (its pinned fleet key, or its
        pinned bundle roots), so a mark made against one vault never guards
        a first backup against another."""
        pinned = self.fleet_public_key or f"{self.operator_root}|{self.witness_root}"
        return hashlib.sha256(pinned.encode()).hexdigest()[:32]

    def save(self, path: Path | None = None) -> Path:
        path = path or config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        vault = {"url": self.url, "transport": self.transport}
        if self.fleet_public_key:
            vault.update(fleet_public_key=self.fleet_public_key, fleet_id=self.fleet_id)
        if self.operator_root and self.witness_root:
            vault.update(operator_root=self.operator_root, witness_root=self.witness_root,
                         bundle_max_age_days=self.bundle_max_age_days)
        if self.edge_url:
            vault.update(edge_url=self.edge_url, edge_public_key=self.edge_public_key or "")
        identity = {"user_id": self.user_id, "token": self.token}
        if self.device_key:
            identity["device_key"] = self.device_key
        data = {"vault": vault, "identity": identity}
        if self.dev_state_dir:
            data["dev"] = {"state_dir": self.dev_state_dir}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            tomli_w.dump(data, f)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> ClientConfig:
        path = path or config_path()
        if not path.exists():
            raise ConfigError(f"no client config at {path}; run `bkv dev up` (local fleet) or write one "
                              "(see docs/cli.md)")
        try:
            data = tomllib.loads(path.read_text())
            vault, identity = data["vault"], data["identity"]
            cfg = cls(url=vault["url"], fleet_public_key=vault.get("fleet_public_key", ""),
                      operator_root=vault.get("operator_root"), witness_root=vault.get("witness_root"),
                      user_id=identity["user_id"], token=identity["token"],
                      dev_state_dir=data.get("dev", {}).get("state_dir"), edge_url=vault.get("edge_url"),
                      edge_public_key=vault.get("edge_public_key"), device_key=identity.get("device_key"),
                      transport=vault.get("transport", "noise"),
                      bundle_max_age_days=float(vault.get("bundle_max_age_days", 7.0)))
            if not cfg.bundle_max_age_days > 0:
                raise ValueError("bundle_max_age_days must be a positive number of days")
            if cfg.transport not in ("noise", "plaintext"):
                raise ValueError("transport must be noise or plaintext")
            if cfg.fleet_public_key:
                cfg.fleet_key_der  # noqa: B018 - validate the pinned key now, not mid-operation
            elif not (cfg.operator_root and cfg.witness_root):
                raise ValueError("pin either fleet_public_key or both operator_root and witness_root")
        except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"the client config at {path} is incomplete or malformed: {exc}") from None
        return cfg


class EscrowMarks:
    """Which (vault, account) pairs this device has escrowed a key for, or
    recovered one from: ``escrowed.json`` beside the config.

    Why: a ``no_record`` or ``record_destroyed`` answer may be forged on the
    network path; if the device then made a new key and escrowed it, the
    real escrow would be replaced and every earlier backup lost. Once this
    device knows the account has a key, ``bkv backup`` never makes a new one
    on its own (docs/cli.md). Holds no secret: user ids and vault digests only.
    A file that does not parse counts as "escrowed" for every account: the
    safe side.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_path().with_name("escrowed.json")

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("accounts"), list):
                return None
            return data
        except FileNotFoundError:
            return {"accounts": []}
        except (OSError, ValueError):
            return None

    @staticmethod
    def _id(cfg: ClientConfig) -> dict:
        return {"vault": cfg.vault_anchor, "user_id": cfg.user_id}

    def has(self, cfg: ClientConfig) -> bool:
        data = self._read()
        if data is None:
            return True
        want = self._id(cfg)
        return any(isinstance(a, dict) and {k: a.get(k) for k in want} == want for a in data["accounts"])

    def mark(self, cfg: ClientConfig) -> None:
        if self.has(cfg):
            return
        data = self._read() or {"accounts": []}
        data["accounts"].append({**self._id(cfg), "since": int(time.time())})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)
