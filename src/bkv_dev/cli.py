"""``bkv dev`` and ``bkv demo``: the local fleet from the command line.

Registered into the client's ``bkv`` through the ``bkv.commands`` entry point,
so a client-only install (``pip install ./protocol ./client``) has neither.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Optional

import typer

from bkv import errors
from bkv.exitcodes import ExitCode, fail

dev = typer.Typer(help="Run a local fleet (etcd, SoftHSM2, hsm-proxy, islands, frontend) on loopback.",
                  no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dev, name="dev")
    app.command("demo")(demo)


def _device_identity(fleet, user: str, previous=None):
    """(device key b64, bound token): reuse this device's key if it has one."""
    import base64

    from bkv_protocol.noise import StaticKey

    key_b64 = previous.device_key if previous is not None and previous.device_key else \
        base64.b64encode(StaticKey.generate().reveal()).decode()
    public = base64.b64encode(StaticKey(base64.b64decode(key_b64)).public).decode()
    return key_b64, fleet.issuer().mint(user, device_key_b64=public)


def _dev_config(fleet, user: str, previous=None):
    from bkv.config import ClientConfig

    device_key, token = _device_identity(fleet, user, previous)
    edge = fleet.spec.edge
    return ClientConfig(url=fleet.frontend_url, fleet_public_key=fleet.fleet_params["fleet_public_key"],
                        user_id=user, token=token, dev_state_dir=str(fleet.state),
                        edge_url=fleet.edge_url if edge else None,
                        edge_public_key=fleet.edge_public_key if edge else None,
                        device_key=device_key, transport="plaintext" if fleet.spec.allow_plaintext else "noise",
                        operator_root=fleet.root_public_keys()[0] if edge else None,
                        witness_root=fleet.root_public_keys()[1] if edge else None)


def _fleet(state_dir: Optional[Path], base_port: Optional[int] = None):
    from bkv_dev.fleet import Fleet, FleetSpec, default_state_dir

    state = state_dir or default_state_dir()
    fleet = Fleet(FleetSpec(state_dir=str(state)))
    if fleet.load() and base_port is not None and base_port != fleet.spec.base_port:
        fail(f"the fleet in {state} uses base port {fleet.spec.base_port}; run `bkv dev down` first", ExitCode.USAGE)
    if base_port is not None:
        fleet.spec.base_port = base_port
    return fleet


StateDir = typer.Option(None, "--state-dir", help="where the fleet keeps everything (default "
                        "$XDG_STATE_HOME/bkv/dev or $BKV_DEV_STATE)")


@dev.command("up")
def dev_up(base_port: Optional[int] = typer.Option(None, help="first of the fleet's loopback ports (default 18000)"),
           state_dir: Optional[Path] = StateDir,
           user: str = typer.Option("dev-user", help="the dev identity written to the client config"),
           plaintext: bool = typer.Option(False, "--plaintext", help=(
               "dev only: let clients skip the Noise edge and talk plain HTTP to the frontend")),
           sites: int = typer.Option(0, "--sites", min=0, max=9, help=(
               "run etcd, hsm-proxies and island replicas in this many sites, each a network namespace "
               "of its own (root only; 0: all on loopback)"))) -> None:
    """Start the local fleet in the background (idempotent) and write the client config.

    Example: bkv dev up && bkv dev status
    """
    from bkv.config import ClientConfig
    from bkv_dev.fleet import FleetError

    fleet = _fleet(state_dir, base_port)
    if plaintext:
        fleet.spec.allow_plaintext = True
    if sites:
        from bkv_dev.fleet import Fleet

        fleet.spec.sites = sites
        fleet = Fleet(fleet.spec)  # one etcd member and one hsm-proxy per site
    try:
        fleet.up()
    except FleetError as exc:
        fail(str(exc), ExitCode.ERROR)
    params = fleet.fleet_params
    try:
        previous = ClientConfig.load()
    except Exception:  # noqa: BLE001 - no usable config yet: a new device key
        previous = None
    cfg = _dev_config(fleet, user, previous)
    path = cfg.save()
    where = fleet.frontend_url if cfg.transport == "plaintext" else f"{fleet.edge_url} (Noise, via Envoy)"
    typer.echo(f"fleet up: {where} (fleet {params['fleet_id']}, max {params['max_attempts']} attempts)")
    typer.echo(f"client config: {path} (user {user})")


@dev.command("down")
def dev_down(purge: bool = typer.Option(False, help="also delete the state directory: etcd data, token, logs"),
             state_dir: Optional[Path] = StateDir) -> None:
    """Stop the local fleet. With --purge every record and key is gone for good."""
    fleet = _fleet(state_dir)
    if not fleet.load():
        typer.echo("no local fleet recorded")
        if purge and fleet.state.exists():
            import shutil

            shutil.rmtree(fleet.state)
        return
    fleet.down(purge=purge)
    typer.echo("fleet stopped" + (" and purged" if purge else ""))


@dev.command("status")
def dev_status(state_dir: Optional[Path] = StateDir,
               as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show each part of the local fleet, its port and whether it is ready."""
    fleet = _fleet(state_dir)
    if not fleet.load():
        fail("no local fleet; run `bkv dev up`", ExitCode.ERROR)
    rows = fleet.status()
    if as_json:
        typer.echo(json.dumps(rows))
    else:
        for r in rows:
            typer.echo(f"{r['name']:<14} {r['state']:<9} port {r['port']:<6} pid {r['pid'] or '-'}")
    if any(r["state"] != "ready" for r in rows):
        raise typer.Exit(1)


@dev.command("login")
def dev_login(user: str = typer.Argument(..., help="the account to act as"), state_dir: Optional[Path] = StateDir) -> None:
    """Switch the client config's identity to USER (the dev issuer signs for anyone).

    Example: bkv dev login alice
    """
    from bkv.config import ClientConfig, ConfigError

    fleet = _fleet(state_dir)
    if not fleet.load():
        fail("no local fleet; run `bkv dev up`", ExitCode.ERROR)
    try:
        previous = ClientConfig.load()
    except ConfigError:
        previous = None
    try:
        _dev_config(fleet, user, previous).save()
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    typer.echo(f"now acting as {user}")


@dev.command("issuer")
def dev_issuer(state_dir: Optional[Path] = StateDir) -> None:
    """Print the path of the dev issuer's public key (made if missing), for a cluster install.

    Example: helm install bkv charts/backup-key-vault --set-file auth.tokenPublicKey=$(bkv dev issuer)
    """
    from bkv_dev.fleet import default_state_dir
    from bkv_dev.issuer import DevIssuer

    directory = (state_dir or default_state_dir()) / "issuer"
    DevIssuer.load_or_create(directory)
    typer.echo(str(directory / "issuer-public.pem"))


@dev.command("member-set")
def dev_member_set(release: str = typer.Option("bkv", help="the Helm release name"),
                   replicas: int = typer.Option(1, help="hsm.replicas of the install"),
                   state_dir: Optional[Path] = StateDir) -> None:
    """Print the path of the install's hsm-proxy set signed by the dev admin key (made if missing).

    Example: helm install bkv charts/backup-key-vault --set-file hsm.memberSet=$(bkv dev member-set --replicas 3)
    """
    from bkv_dev.admin import chart_members, member_set_file
    from bkv_dev.fleet import default_state_dir

    typer.echo(str(member_set_file((state_dir or default_state_dir()) / "admin", chart_members(release, replicas))))


@dev.command("island-set")
def dev_island_set(islands: str = typer.Option("island-a,island-b", help="the install's islands, comma-separated"),
                   state_dir: Optional[Path] = StateDir) -> None:
    """Print the path of the install's first island set signed by the dev admin key (made if missing).

    Example: helm install bkv charts/backup-key-vault --set-file hsm.islandSet=$(bkv dev island-set)
    """
    from bkv_dev.admin import island_set_file
    from bkv_dev.fleet import default_state_dir
    from bkv_protocol.islands import IslandSet, IslandSetError

    try:
        s = IslandSet.of(islands.split(","))
    except IslandSetError as exc:
        fail(str(exc), ExitCode.USAGE)
    typer.echo(str(island_set_file((state_dir or default_state_dir()) / "admin", s)))


@dev.command("cluster")
def dev_cluster(edge_url: str = typer.Option(..., help="where the cluster's Envoy listens, e.g. a port-forward"),
                fleet_configmap: Path = typer.Option(..., help="`kubectl get configmap <release>-fleet-public "
                                                               "-o json` saved to a file"),
                user: str = typer.Option("dev-user", help="the dev identity written to the client config"),
                state_dir: Optional[Path] = StateDir) -> None:
    """Point the client config at a dev install in Kubernetes (tokens from the dev issuer).

    Example: bkv dev cluster --edge-url http://127.0.0.1:8443 --fleet-configmap fleet-public.json
    """
    import base64
    import json

    from bkv.config import ClientConfig, ConfigError
    from bkv_dev.fleet import default_state_dir
    from bkv_protocol.noise import StaticKey
    from bkv_dev.issuer import DevIssuer

    try:
        data = json.loads(fleet_configmap.read_text())["data"]
        fleet_key, edge_key = data["fleet_public_key"], data["edge_public_key"]
    except (OSError, ValueError, KeyError):
        fail(f"{fleet_configmap} is not the fleet ConfigMap as JSON (kubectl get configmap ... -o json)",
              ExitCode.USAGE)
    try:
        previous = ClientConfig.load()
    except ConfigError:
        previous = None
    device_key = previous.device_key if previous is not None and previous.device_key else \
        base64.b64encode(StaticKey.generate().reveal()).decode()
    public = base64.b64encode(StaticKey(base64.b64decode(device_key)).public).decode()
    issuer = DevIssuer.load_or_create((state_dir or default_state_dir()) / "issuer")
    try:
        token = issuer.mint(user, device_key_b64=public)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    path = ClientConfig(url=edge_url, fleet_public_key=fleet_key, user_id=user, token=token, edge_url=edge_url,
                        edge_public_key=edge_key, device_key=device_key, transport="noise").save()
    typer.echo(f"client config: {path} (user {user}, fleet {data.get('fleet_id', '?')}, via {edge_url})")


def demo(state_dir: Optional[Path] = StateDir) -> None:
    """Register a key with a password, recover it as a new device, show a wrong
    password with the attempts left, then a lockout. Needs `bkv dev up`."""
    from bkv.config import ClientConfig, ConfigError

    try:
        cfg = ClientConfig.load()
    except ConfigError as exc:
        fail(str(exc), ExitCode.USAGE)
    fleet = _fleet(Path(cfg.dev_state_dir) if cfg.dev_state_dir and not state_dir else state_dir)
    if not fleet.load():
        fail("the demo needs the local fleet; run `bkv dev up`", ExitCode.ERROR)
    asyncio.run(_demo(cfg, fleet))


async def _demo(cfg, fleet) -> None:
    import dataclasses

    from bkv_protocol.secrets import BackupKey

    user = f"demo-{secrets.token_hex(3)}"
    password = "correct horse battery staple"
    say = typer.echo

    def device():
        # A phone of its own: its own Noise key and a token bound to it.
        return dataclasses.replace(_dev_config(fleet, user), transport=cfg.transport).client()

    via = "plain HTTP (--plaintext)" if cfg.transport == "plaintext" else f"Noise through Envoy at {cfg.edge_url}"
    say(f"== demo as {user}, {via} (fleet {cfg.fleet_id})")
    k = BackupKey(os.urandom(32))
    fingerprint = __import__("hashlib").sha256(k.reveal()).hexdigest()[:12]
    async with device() as phone:
        reg = await phone.register(k, password)
    say(f"1. old phone: made K (sha256 {fingerprint}...) and escrowed it; {reg.max_attempts} attempts allowed")
    async with device() as new_phone:
        rec = await new_phone.recover(password)
        got = __import__("hashlib").sha256(rec.key.reveal()).hexdigest()[:12]
        say(f"2. new phone, nothing stored: recovered K (sha256 {got}...): {'same key' if rec.key == k else 'MISMATCH'}")
        try:
            await new_phone.recover("correct horse battery stable")
        except errors.WrongPassword as exc:
            say(f"3. a typo in the password: {exc}")
        say("4. an attacker keeps guessing:")
        while True:
            try:
                await new_phone.recover(f"guess-{secrets.token_hex(2)}")
            except errors.WrongPassword as exc:
                say(f"   {exc}")
                if exc.attempts_left == 0:
                    break
        try:
            await new_phone.recover(password)
        except errors.LockedOut as exc:
            say(f"5. even the right password now fails: {exc}")
    if rec.key != k:
        raise typer.Exit(1)
