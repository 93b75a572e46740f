"""``bkv-hsm-proxy serve | start | fleet-init | admin-key | sign-members | sign-freeze | freeze | change-members |
sign-islands | store-island-set | init-state | log-heads | retire-fleet | publish-configmap | publish-bundle |
resign-bundle | evidence``: one function per subcommand, registered with its flags (bkv_server.shell)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from bkv_hsm_proxy.settings import HsmAdminSettings, HsmProxySettings
from bkv_server.shell import Shell, arg

cli = Shell("bkv-hsm-proxy", "The HSM boundary of Backup Key Vault.")


def bd_default_days() -> float:
    from bkv_protocol.bundle import DEFAULT_VALIDITY_S

    return DEFAULT_VALIDITY_S / 86400


def token_command(name: str, help: str, *args: tuple):
    """A subcommand that opens the token (settings: all of BKV_HSM_*): an HSM
    that fails, or does not answer in time, is exit 3."""

    def register(fn):
        @functools.wraps(fn)
        def guarded(parsed: argparse.Namespace, settings: HsmProxySettings) -> int:
            from bkv_protocol.retry import DeadlineExceeded
            from bkv_hsm_proxy.errors import HsmError

            try:
                return fn(parsed, settings)
            except HsmError as exc:
                return cli.fail(f"HSM error: {exc}", 3)
            except DeadlineExceeded as exc:
                return cli.fail(f"HSM error: {exc.__cause__}", 3)

        cli.command(name, help, *args, settings=HsmProxySettings)(guarded)
        return fn

    return register


def _freezes(paths: list[Path]) -> list:
    """Freeze statements (``bkv-hsm-proxy freeze`` output), parsed."""
    from bkv_protocol import hsm_api

    return [hsm_api.FreezeOut.model_validate_json(f.read_bytes()) for f in paths]


def _set_and_freezes(args: argparse.Namespace):
    """``--member-set`` and ``--freezes`` (change-members, start), parsed."""
    from bkv_protocol import members as ms

    return ms.SignedMemberSet.from_json(args.member_set.read_bytes()), _freezes(args.freezes)


@token_command("serve", "serve the hsm-proxy API (settings from BKV_HSM_* variables)")
def serve(args, settings: HsmProxySettings) -> int:
    return _serve(settings)


@token_command("start", "make the state file on a first start, or adopt a newer member set (with its freezes), then "
                        "serve; refuses a state file lost and made again (exit 4; the chart's hsm-proxy, "
                        "docs/kubernetes.md)",
               arg("--hsm-id", required=True, help="this hsm-proxy's id, one of the member set's"),
               arg("--member-set", type=Path, required=True, help="the newest signed member set (hsm.memberSet)"),
               arg("--freezes", type=Path, nargs="*", default=[],
                   help="the freeze statements that set was made from (a change; hsm.memberFreezes)"),
               arg("--wait-for-fleet-init", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for fleet-init to finish writing the token (a new install: the "
                        "chart starts the hsm-proxies beside the fleet-init Job); then exit 4"))
def start(args, settings: HsmProxySettings) -> int:
    def prepare():
        """The state file made or its set adopted, in this process (the state
        file's lock is held from before this until exit): the open token, or an exit code."""
        from bkv_protocol import members as ms
        from bkv_hsm_proxy import membership, nvram
        from bkv_hsm_proxy.core import VaultHsm
        from bkv_hsm_proxy.fleet_init import TokenNotInitialized, wait_for_fleet_init
        from bkv_hsm_proxy.hsm import open_token

        try:
            signed, freezes = _set_and_freezes(args)
        except (ms.MemberSetError, OSError, ValueError) as exc:
            return cli.fail(exc, 1)
        pin = settings.user_pin.get_secret_value()
        try:
            hsm = wait_for_fleet_init(
                lambda rescan: open_token(settings.pkcs11_module, settings.token_label, pin, rescan=rescan),
                args.wait_for_fleet_init, say=lambda m: print(m, file=sys.stderr))
        except TokenNotInitialized as exc:
            return cli.fail(exc, 4)
        try:
            done = membership.start(hsm, lambda: VaultHsm(hsm, max_attempts=settings.max_attempts).log_key,
                                    settings.state_file, args.hsm_id, signed, freezes,
                                    membership.read_chain(settings.etcd_endpoints, settings.etcd_prefix))
        except membership.ChangeRefused as exc:
            return cli.fail(f"member set not changed: {exc}", 1)
        except ValueError as exc:  # not one of the set's hsm-proxies
            return cli.fail(exc, 1)
        except (membership.MembersFixed, nvram.StateFileError, OSError) as exc:
            return cli.fail(exc, 4)
        print(f"bkv-hsm-proxy: state file {done} ({args.hsm_id}, epoch {signed.set.epoch})", file=sys.stderr)
        return hsm

    return _serve(settings, prepare)


def _serve(settings: HsmProxySettings, prepare=None) -> int:
    """Serve from the state file, held (locked) until exit; ``prepare`` (start)
    runs first under the lock and gives the open token or an exit code."""
    from bkv_hsm_proxy import membership, nvram
    from bkv_hsm_proxy.core import VaultHsm
    from bkv_hsm_proxy.hsm import open_token

    try:
        lock = nvram.hold(settings.state_file)  # held while this process serves
    except (nvram.StateFileError, OSError) as exc:
        return cli.fail(exc, 4)
    if nvram.upgrade_state(settings.state_file):  # an upgrade from a build before birth ids
        print(f"bkv-hsm-proxy: state file {settings.state_file} upgraded to format {nvram.FORMAT}", file=sys.stderr)
    hsm = None
    if prepare is not None:
        hsm = prepare()
        if isinstance(hsm, int):
            return hsm
    try:
        state, identity = nvram.open_state(settings.state_file)
    except (nvram.StateFileError, OSError) as exc:
        return cli.fail(exc, 4)
    from bkv_server.service import run
    from bkv_hsm_proxy.app import create_app

    hsm = hsm or open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        membership.check_members(hsm, identity)
        membership.check_born(hsm, identity)  # after the set: a file naming another set is refused as such
    except membership.MembersFixed as exc:
        return cli.fail(exc, 4)
    vault = VaultHsm(hsm, max_attempts=settings.max_attempts, guess_delays_s=settings.guess_delays_s)
    vault.attach_log(state, identity.hsm, list(identity.members), identity.epoch)
    run(create_app(vault), settings.host, settings.port, settings.metrics_port)
    os.close(lock)
    return 0


@token_command("fleet-init", "create the fleet keys and OPAQUE setup in the token (idempotent)",
               arg("--out", type=Path, help="write the public fleet parameters here (JSON)"),
               arg("--new-generation", action="store_true",
                   help="rotation: add a new fleet (new keys in the token) and describe it"),
               arg("--admin-public-key", help="the offline admin key's public half (base64, from `admin-key`): "
                                              "fixed in the token the first time"),
               arg("--member-set", type=Path, help="the fleet's hsm-proxies, signed by the admin key (from "
                                                   "`sign-members`): fixed in the token the first time"),
               arg("--island-set", type=Path, help="the fleet's islands, signed by the admin key (from "
                                                   "`sign-islands`): stored in the token if it is its next set"),
               arg("--hsm-members", help="also check that the signed set names exactly these hsm-proxies "
                                         "(comma-separated; the chart passes what hsm.replicas makes)"))
def fleet_init(args, settings: HsmProxySettings) -> int:
    from bkv_protocol import islands as isl
    from bkv_protocol import members as ms
    from bkv_protocol.encoding import b64d
    from bkv_hsm_proxy.errors import IslandSetRefused
    from bkv_hsm_proxy.fleet_init import fleet_init as init
    from bkv_hsm_proxy.membership import MembersFixed

    try:
        island_set = isl.SignedIslandSet.from_json(args.island_set.read_bytes()) if args.island_set else None
        signed = ms.SignedMemberSet.from_json(args.member_set.read_bytes()) if args.member_set else None
        if args.hsm_members and signed is None:
            raise MembersFixed("--hsm-members checks a signed set: give it with --member-set")
        if args.hsm_members and ms.MemberSet.of(args.hsm_members.split(",")).members != signed.set.members:
            raise MembersFixed(f"the signed member set does not name exactly {args.hsm_members}: sign the "
                               "set this deployment runs (`bkv-hsm-proxy sign-members`)")
        params = init(settings, args.out, new_generation=args.new_generation,
                      admin_public_key=b64d(args.admin_public_key) if args.admin_public_key else None,
                      member_set=signed, island_set=island_set)
    except (MembersFixed, IslandSetRefused, ms.MemberSetError, OSError, ValueError) as exc:
        return cli.fail(exc, 1)
    print(json.dumps({k: params[k] for k in ("fleet_id", "fleet_public_key", "max_attempts", "created")}))
    return 0


OUT_SIGNED = arg("--out", type=Path, required=True)
ADMIN_KEY = arg("--admin-key", type=Path, required=True)


def _offline(fn):
    """An offline subcommand (the admin key only): a refused set, or a file
    that cannot be read or written, is exit 1."""

    @functools.wraps(fn)
    def guarded(args) -> int:
        from bkv_protocol import islands as isl
        from bkv_protocol import members as ms

        try:
            out = fn(args)
        except (ms.MemberSetError, isl.IslandSetError, OSError, ValueError) as exc:
            return cli.fail(exc, 1)
        print(json.dumps(out))
        return 0

    return guarded


@cli.command("admin-key", "offline: make the admin key that signs the fleet's member set (keep it off the fleet's "
                          "machines)",
             arg("--out", type=Path, required=True, help="the private key file to write (base64 Ed25519, 0600)"))
@_offline
def admin_key(args) -> dict:
    from bkv_protocol import bundle as bd

    key = bd.new_root_key_file(args.out)  # never overwrites a key
    return {"admin_public_key": bd.public_key_b64(key), "key_file": str(args.out)}


@cli.command("sign-members", "offline: sign the fleet's set of hsm-proxies with the admin key",
             ADMIN_KEY,
             arg("--members", required=True, help="every hsm-proxy of the fleet, comma-separated"),
             arg("--epoch", type=int, default=1, help="1 for a new fleet; the next epoch for a change"),
             arg("--freezes", type=Path, nargs="*", default=[],
                 help="a change: the old set's freeze statements (from `freeze`); the set takes over at the "
                      "newest heads they name"),
             arg("--out", type=Path, required=True, help="the signed member set to write (JSON)"))
@_offline
def sign_members(args) -> dict:
    from bkv_protocol import bundle as bd
    from bkv_protocol import members as ms
    from bkv_hsm_proxy.membership import newest_frozen

    freezes = _freezes(args.freezes)
    signed = ms.sign(ms.MemberSet.of(args.members.split(","), args.epoch, newest_frozen(freezes)),
                     bd.load_root_key(args.admin_key))
    args.out.write_text(signed.to_json())
    return {"epoch": signed.set.epoch, "members": list(signed.set.members),
            "admin_public_key": bd.public_key_b64(bd.load_root_key(args.admin_key))}


@cli.command("sign-freeze", "offline: the admin's order that the set of EPOCH freezes (a change of the member set "
                            "begins)",
             ADMIN_KEY, arg("--epoch", type=int, required=True, help="the set to freeze (the one serving now)"),
             OUT_SIGNED)
@_offline
def sign_freeze(args) -> dict:
    from bkv_protocol import bundle as bd
    from bkv_protocol import members as ms

    args.out.write_text(ms.sign_freeze(args.epoch, bd.load_root_key(args.admin_key)).to_json())
    return {"freeze_epoch": args.epoch}


@cli.command("sign-islands", "offline: sign the fleet's island set with the admin key (which island holds a user: "
                             "the boundary's word, not etcd's)",
             ADMIN_KEY,
             arg("--islands", required=True, help="every island of the fleet, comma-separated"),
             arg("--epoch", type=int, default=1, help="1 for a new fleet; the token's newest + 1 for a change"),
             arg("--previous", help="while records move to a new island (add-island): the islands before, "
                                    "comma-separated"),
             arg("--out", type=Path, required=True, help="the signed island set to write (JSON)"))
@_offline
def sign_islands(args) -> dict:
    from bkv_protocol import bundle as bd
    from bkv_protocol import islands as isl

    key = bd.load_root_key(args.admin_key)
    signed = isl.sign(isl.IslandSet.of(args.islands.split(","), args.epoch,
                                       args.previous.split(",") if args.previous else None), key)
    args.out.write_text(signed.to_json())
    return {"epoch": signed.set.epoch, "islands": list(signed.set.islands),
            "previous": None if signed.set.previous is None else list(signed.set.previous)}


@cli.command("store-island-set", "deliver a signed island set to running hsm-proxies, which store it as their "
                                 "token's next one (no token, no PIN: the admin's signature is its authority)",
             arg("--island-set", type=Path, required=True, help="the file sign-islands wrote (- for stdin)"),
             arg("--hsm-url", action="append", required=True,
                 help="an hsm-proxy, e.g. http://127.0.0.1:8100; repeat for every one of the fleet"))
def store_island_set(args) -> int:  # a client of the running hsm-proxies: no token, no PIN
    import asyncio

    from bkv_protocol import islands as isl
    from bkv_server.fleetmap import store_island_set as store
    from bkv_server.http import UpstreamError, UpstreamUnavailable

    try:
        text = sys.stdin.read() if str(args.island_set) == "-" else args.island_set.read_text()
        isl.SignedIslandSet.from_json(text)  # refused here already if it does not parse
        out = {url: {"epoch": got.epoch, "stored": got.stored}
               for url, got in asyncio.run(store(args.hsm_url, text)).items()}
    except (isl.IslandSetError, OSError, UpstreamError, UpstreamUnavailable) as exc:
        return cli.fail(f"island set not stored: {exc}", 1)
    print(json.dumps(out))
    return 0


@cli.command("freeze", "freeze a running hsm-proxy with the admin's order; prints its freeze statement (JSON, for "
                       "sign-members --freezes and change-members)",
             arg("--order", type=Path, required=True, help="the file sign-freeze wrote (- for stdin: "
                                                           "kubectl exec -i ... < order.json)"),
             arg("--hsm-url", required=True, help="the hsm-proxy, e.g. http://127.0.0.1:8100"))
def freeze(args) -> int:  # a client of the running hsm-proxy: no token, no PIN
    import asyncio

    from bkv_protocol import hsm_api
    from bkv_protocol import members as ms
    from bkv_server.http import ServiceClient, UpstreamError, UpstreamUnavailable

    async def ask() -> hsm_api.FreezeOut:
        order = ms.FreezeOrder.from_json(sys.stdin.buffer.read() if str(args.order) == "-"
                                         else args.order.read_bytes())
        client = ServiceClient("hsm-proxy", [args.hsm_url])
        try:
            return await client.call("POST", "/hsm/v1/members/freeze", hsm_api.FreezeIn(
                epoch=order.epoch, admin_public_key=order.admin_public_key, signature=order.signature),
                hsm_api.FreezeOut, idempotent=True)
        finally:
            await client.aclose()

    try:
        print(asyncio.run(ask()).model_dump_json())
    except (ms.MemberSetError, OSError, UpstreamError, UpstreamUnavailable) as exc:
        return cli.fail(f"not frozen: {exc}", 1)
    return 0


@token_command("change-members", "adopt the next member set on this hsm-proxy (stopped): checks the set and the "
                                 "freezes, stores the set in the token, writes the state file at the heads it takes "
                                 "over (settings from BKV_HSM_*)",
               arg("--hsm-id", required=True),
               arg("--member-set", type=Path, required=True, help="the next set (sign-members --freezes)"),
               arg("--freezes", type=Path, nargs="+", required=True, help="the freeze statements it was made from"))
def change_members(args, settings: HsmProxySettings) -> int:
    from bkv_protocol import members as ms
    from bkv_hsm_proxy import membership, nvram
    from bkv_hsm_proxy.core import VaultHsm
    from bkv_hsm_proxy.hsm import open_token

    try:
        signed, freezes = _set_and_freezes(args)
    except (ms.MemberSetError, OSError, ValueError) as exc:
        return cli.fail(exc, 1)
    hsm = open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        identity = membership.change_members(
            hsm, VaultHsm(hsm, max_attempts=settings.max_attempts).log_key, settings.state_file, args.hsm_id,
            signed, freezes, membership.read_chain(settings.etcd_endpoints, settings.etcd_prefix))
    except (membership.MembersFixed, nvram.StateFileError, OSError) as exc:
        return cli.fail(f"member set not changed: {exc}", 1)
    finally:
        hsm.close()
    print(json.dumps({"hsm": identity.hsm, "members": list(identity.members), "epoch": identity.epoch}))
    return 0


@token_command("retire-fleet", "rotation: destroy a fleet's keys once no record uses it", arg("fleet_id"))
def retire_fleet(args, settings: HsmProxySettings) -> int:
    from bkv_hsm_proxy.fleet_init import RetireRefused
    from bkv_hsm_proxy.fleet_init import retire_fleet as retire

    try:
        params = retire(settings, args.fleet_id)
    except RetireRefused as exc:
        return cli.fail(f"not retired: {exc}", 1)
    print(json.dumps({"retired": args.fleet_id, "fleet_id": params["fleet_id"]}))
    return 0


@cli.command("publish-configmap", "write the public fleet parameters to a Kubernetes ConfigMap (run inside the "
                                  "cluster by the fleet-init Job)",
             arg("--params", type=Path, required=True, help="the file fleet-init --out wrote"),
             arg("--name", required=True, help="the ConfigMap's name"),
             arg("--edge-public-key-file", type=Path, help="also publish the Noise edge public key"),
             arg("--serviceaccount-dir", type=Path, default=Path("/var/run/secrets/kubernetes.io/serviceaccount")))
def publish_configmap(args) -> int:
    from bkv_protocol.retry import DeadlineExceeded
    from bkv_hsm_proxy.kube import PublishError
    from bkv_hsm_proxy.kube import publish_configmap as publish

    try:
        data = publish(args.params, args.name, edge_public_key_file=args.edge_public_key_file,
                       serviceaccount_dir=args.serviceaccount_dir)
    except (PublishError, OSError, DeadlineExceeded) as exc:
        return cli.fail(f"cannot publish the fleet ConfigMap: {exc}", 1)
    print(json.dumps({"configmap": args.name, "fleet_id": data["fleet_id"]}))
    return 0


OPERATOR_KEY = arg("--operator-key", type=Path, required=True, help="the operator root key file (base64 Ed25519)")
WITNESS_URL = arg("--witness-url", required=True)


def _bundle_etcd_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expires-in-days", type=float, default=bd_default_days(),
                   help="the bundle's own expiry (signed); clients also stop at their max age")
    p.add_argument("--etcd-endpoints", help="default $BKV_HSM_ETCD_ENDPOINTS")
    p.add_argument("--etcd-prefix", help="default $BKV_HSM_ETCD_PREFIX, else /bkv")


@cli.command("publish-bundle", "sign the next validation bundle, have the witness countersign it, and publish it in "
                               "etcd (docs/ota.md)",
             OPERATOR_KEY, WITNESS_URL,
             arg("--fleet-params", type=Path, action="append", required=True,
                 help="a fleet's parameters (fleet-init --out); repeat for each fleet, preferred first"),
             arg("--edge-public-key", action="append", required=True,
                 help="the Noise edge key (base64) for each --fleet-params, in order"),
             arg("--valid-days", type=float, default=365.0, help="each fleet's validity window"),
             setup=_bundle_etcd_flags, settings=HsmAdminSettings)
def publish_bundle(args, settings: HsmAdminSettings) -> int:
    from bkv_hsm_proxy.bundles import fleet_entry

    if len(args.fleet_params) != len(args.edge_public_key):
        cli.error("give one --edge-public-key per --fleet-params")
    return _publish(args, settings, lambda now: [fleet_entry(p, e, args.valid_days, now)
                                                 for p, e in zip(args.fleet_params, args.edge_public_key)])


@cli.command("resign-bundle", "re-publish the current bundle's fleets with a fresh issued_at and expires_at; run it "
                              "daily (docs/ota.md, Freshness)",
             OPERATOR_KEY, WITNESS_URL,
             arg("--min-age-hours", type=float, default=0.0,
                 help="do nothing if the current bundle was issued less than this long ago"),
             setup=_bundle_etcd_flags, settings=HsmAdminSettings)
def resign_bundle(args, settings: HsmAdminSettings) -> int:
    from bkv_hsm_proxy.bundles import same_fleets

    return _publish(args, settings, lambda now: same_fleets)


def _publish(args, settings: HsmAdminSettings, fleets) -> int:
    """publish-bundle and resign-bundle: ``fleets(now)`` is what the next bundle lists."""
    import time

    from bkv_protocol import bundle as bd
    from bkv_hsm_proxy.bundles import PublishError, current_bundle, publish_bundle as publish

    endpoints, prefix = args.etcd_endpoints or settings.etcd_endpoints, args.etcd_prefix or settings.etcd_prefix
    if not endpoints:
        cli.error(f"{args.cmd} needs etcd: give --etcd-endpoints or set BKV_HSM_ETCD_ENDPOINTS")
    now = int(time.time())
    try:
        if getattr(args, "min_age_hours", 0) > 0:
            cur = current_bundle(endpoints, prefix)
            if cur is not None and now - cur.bundle.issued_at < args.min_age_hours * 3600:
                print(json.dumps({"sequence": cur.bundle.sequence, "resigned": False}))
                return 0
        out = publish(endpoints, prefix, bd.load_root_key(args.operator_key), args.witness_url, fleets(now), now,
                      int(args.expires_in_days * 86400))
    except (PublishError, bd.BundleError, OSError, ValueError) as exc:
        return cli.fail(f"no bundle published: {exc}", 1)
    b = out.bundle.bundle
    print(json.dumps({"sequence": b.sequence, "fleets": [f.fleet_id for f in b.fleets], "issued_at": b.issued_at,
                      "expires_at": b.expires_at, "finished_pending": list(out.finished)}))
    return 0


def _state_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-file", help="the state file (default $BKV_HSM_STATE_FILE)")


@cli.command("init-state", "create this hsm-proxy's state file (its log heads, the stand-in for HSM NVRAM) and fix "
                           "the fleet's hsm-proxies; refuses to overwrite one",
             arg("--hsm-id", required=True, help="this hsm-proxy's id, one of the member set's"),
             arg("--member-set", type=Path, required=True,
                 help="the signed member set fleet-init fixed in the token (serve checks it is that one)"),
             setup=_state_file_flag, settings=HsmAdminSettings)
def init_state(args, settings: HsmAdminSettings) -> int:  # the state file only: no token, no PIN
    from bkv_protocol import members as ms
    from bkv_hsm_proxy import nvram

    state_file = args.state_file or settings.state_file
    try:
        signed = ms.SignedMemberSet.from_json(args.member_set.read_bytes())
        identity = nvram.init_state(state_file, args.hsm_id, signed.set)
    except (nvram.StateFileError, ValueError, OSError) as exc:
        return cli.fail(exc, 1)
    print(json.dumps({"state_file": state_file, "hsm": identity.hsm, "epoch": identity.epoch}))
    return 0


@cli.command("log-heads", "print the log head this hsm-proxy captured for each island (JSON)",
             setup=_state_file_flag, settings=HsmAdminSettings)
def log_heads(args, settings: HsmAdminSettings) -> int:  # the state file only: no token, no PIN
    from bkv_hsm_proxy import nvram

    try:
        state, identity = nvram.open_state(args.state_file or settings.state_file)
    except (nvram.StateFileError, ValueError, OSError) as exc:
        return cli.fail(exc, 1)
    print(json.dumps({"hsm": identity.hsm, "members": list(identity.members), "epoch": identity.epoch,
                      "frozen": state.frozen, "heads": {i: {"index": h.index, "mac": h.mac.hex()}
                                                        for i, h in sorted(state.durable_heads().items())}}))
    return 0


@token_command("evidence", "the deployment evidence of this token's fleet: signed by the fleet key in the token and "
                           "by the operator (settings from BKV_HSM_*)",
               arg("--bundle", type=Path, required=True, help="the bundle that introduced this fleet (JSON)"),
               arg("--operator-key", type=Path, required=True),
               arg("--out", type=Path))
def evidence(args, settings: HsmProxySettings) -> int:
    from bkv_protocol import bundle as bd
    from bkv_hsm_proxy.evidence import make_evidence, write

    try:
        write(make_evidence(settings, args.bundle.read_text(), bd.load_root_key(args.operator_key)), args.out)
    except (bd.BundleError, OSError, ValueError) as exc:
        return cli.fail(f"no evidence: {exc}", 1)
    return 0


main = cli.main

if __name__ == "__main__":
    sys.exit(main())
