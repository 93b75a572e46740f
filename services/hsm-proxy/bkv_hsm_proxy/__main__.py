"""``bkv-hsm-proxy serve | start | fleet-init | admin-key | sign-members | sign-freeze | freeze | change-members |
sign-islands | store-island-set | init-state | log-heads | retire-fleet | publish-configmap | publish-bundle | resign-bundle | evidence``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def bd_default_days() -> float:
    from bkv_protocol.bundle import DEFAULT_VALIDITY_S

    return DEFAULT_VALIDITY_S / 86400


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bkv-hsm-proxy", description="The HSM boundary of Backup Key Vault.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="serve the hsm-proxy API (settings from BKV_HSM_* variables)")
    st = sub.add_parser("start", help="make the state file on a first start, or adopt a newer member set (with "
                                      "its freezes), then serve; refuses a state file lost and made again (exit 4; "
                                      "the chart's hsm-proxy, docs/kubernetes.md)")
    st.add_argument("--hsm-id", required=True, help="this hsm-proxy's id, one of the member set's")
    st.add_argument("--member-set", type=Path, required=True, help="the newest signed member set (hsm.memberSet)")
    st.add_argument("--freezes", type=Path, nargs="*", default=[],
                    help="the freeze statements that set was made from (a change; hsm.memberFreezes)")
    st.add_argument("--wait-for-fleet-init", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for fleet-init to finish writing the token (a new install: the "
                         "chart starts the hsm-proxies beside the fleet-init Job); then exit 4")
    init = sub.add_parser("fleet-init", help="create the fleet keys and OPAQUE setup in the token (idempotent)")
    init.add_argument("--out", type=Path, help="write the public fleet parameters here (JSON)")
    init.add_argument("--new-generation", action="store_true",
                      help="rotation: add a new fleet (new keys in the token) and describe it")
    init.add_argument("--admin-public-key", help="the offline admin key's public half (base64, from `admin-key`): "
                                                 "fixed in the token the first time")
    init.add_argument("--member-set", type=Path, help="the fleet's hsm-proxies, signed by the admin key (from "
                                                      "`sign-members`): fixed in the token the first time")
    init.add_argument("--island-set", type=Path, help="the fleet's islands, signed by the admin key (from "
                                                      "`sign-islands`): stored in the token if it is its next set")
    init.add_argument("--hsm-members", help="also check that the signed set names exactly these hsm-proxies "
                                            "(comma-separated; the chart passes what hsm.replicas makes)")
    ak = sub.add_parser("admin-key", help="offline: make the admin key that signs the fleet's member set "
                                          "(keep it off the fleet's machines)")
    ak.add_argument("--out", type=Path, required=True, help="the private key file to write (base64 Ed25519, 0600)")
    sm = sub.add_parser("sign-members", help="offline: sign the fleet's set of hsm-proxies with the admin key")
    sm.add_argument("--admin-key", type=Path, required=True)
    sm.add_argument("--members", required=True, help="every hsm-proxy of the fleet, comma-separated")
    sm.add_argument("--epoch", type=int, default=1, help="1 for a new fleet; the next epoch for a change")
    sm.add_argument("--freezes", type=Path, nargs="*", default=[],
                    help="a change: the old set's freeze statements (from `freeze`); the set takes over at the "
                         "newest heads they name")
    sm.add_argument("--out", type=Path, required=True, help="the signed member set to write (JSON)")
    sf = sub.add_parser("sign-freeze", help="offline: the admin's order that the set of EPOCH freezes (a change of "
                                            "the member set begins)")
    sf.add_argument("--admin-key", type=Path, required=True)
    sf.add_argument("--epoch", type=int, required=True, help="the set to freeze (the one serving now)")
    sf.add_argument("--out", type=Path, required=True)
    si = sub.add_parser("sign-islands", help="offline: sign the fleet's island set with the admin key (which "
                                             "island holds a user: the boundary's word, not etcd's)")
    si.add_argument("--admin-key", type=Path, required=True)
    si.add_argument("--islands", required=True, help="every island of the fleet, comma-separated")
    si.add_argument("--epoch", type=int, default=1, help="1 for a new fleet; the token's newest + 1 for a change")
    si.add_argument("--previous", help="while records move to a new island (add-island): the islands before, "
                                       "comma-separated")
    si.add_argument("--out", type=Path, required=True, help="the signed island set to write (JSON)")
    ss = sub.add_parser("store-island-set", help="deliver a signed island set to running hsm-proxies, which "
                                                 "store it as their token's next one (no token, no PIN: the "
                                                 "admin's signature is its authority)")
    ss.add_argument("--island-set", type=Path, required=True, help="the file sign-islands wrote (- for stdin)")
    ss.add_argument("--hsm-url", action="append", required=True,
                    help="an hsm-proxy, e.g. http://127.0.0.1:8100; repeat for every one of the fleet")
    fz = sub.add_parser("freeze", help="freeze a running hsm-proxy with the admin's order; prints its freeze "
                                       "statement (JSON, for sign-members --freezes and change-members)")
    fz.add_argument("--order", type=Path, required=True, help="the file sign-freeze wrote (- for stdin: "
                                                                   "kubectl exec -i ... < order.json)")
    fz.add_argument("--hsm-url", required=True, help="the hsm-proxy, e.g. http://127.0.0.1:8100")
    cm = sub.add_parser("change-members", help="adopt the next member set on this hsm-proxy (stopped): checks the "
                                               "set and the freezes, stores the set in the token, writes the state "
                                               "file at the heads it takes over (settings from BKV_HSM_*)")
    cm.add_argument("--hsm-id", required=True)
    cm.add_argument("--member-set", type=Path, required=True, help="the next set (sign-members --freezes)")
    cm.add_argument("--freezes", type=Path, nargs="+", required=True, help="the freeze statements it was made from")
    rt = sub.add_parser("retire-fleet", help="rotation: destroy a fleet's keys once no record uses it")
    rt.add_argument("fleet_id")
    pub = sub.add_parser("publish-configmap", help="write the public fleet parameters to a Kubernetes ConfigMap "
                                                   "(run inside the cluster by the fleet-init Job)")
    pub.add_argument("--params", type=Path, required=True, help="the file fleet-init --out wrote")
    pub.add_argument("--name", required=True, help="the ConfigMap's name")
    pub.add_argument("--edge-public-key-file", type=Path, help="also publish the Noise edge public key")
    pub.add_argument("--serviceaccount-dir", type=Path, default=Path("/var/run/secrets/kubernetes.io/serviceaccount"))
    pb = sub.add_parser("publish-bundle", help="sign the next validation bundle, have the witness countersign "
                                               "it, and publish it in etcd (docs/ota.md)")
    pb.add_argument("--operator-key", type=Path, required=True, help="the operator root key file (base64 Ed25519)")
    pb.add_argument("--witness-url", required=True)
    pb.add_argument("--fleet-params", type=Path, action="append", required=True,
                    help="a fleet's parameters (fleet-init --out); repeat for each fleet, preferred first")
    pb.add_argument("--edge-public-key", action="append", required=True,
                    help="the Noise edge key (base64) for each --fleet-params, in order")
    pb.add_argument("--valid-days", type=float, default=365.0, help="each fleet's validity window")
    rs = sub.add_parser("resign-bundle", help="re-publish the current bundle's fleets with a fresh issued_at and "
                                              "expires_at; run it daily (docs/ota.md, Freshness)")
    rs.add_argument("--operator-key", type=Path, required=True, help="the operator root key file (base64 Ed25519)")
    rs.add_argument("--witness-url", required=True)
    rs.add_argument("--min-age-hours", type=float, default=0.0,
                    help="do nothing if the current bundle was issued less than this long ago")
    for p in (pb, rs):
        p.add_argument("--expires-in-days", type=float, default=bd_default_days(),
                       help="the bundle's own expiry (signed); clients also stop at their max age")
        p.add_argument("--etcd-endpoints", default=os.environ.get("BKV_HSM_ETCD_ENDPOINTS", "127.0.0.1:2379"))
        p.add_argument("--etcd-prefix", default=os.environ.get("BKV_HSM_ETCD_PREFIX", "/bkv"))
    ist = sub.add_parser("init-state", help="create this hsm-proxy's state file (its log heads, the stand-in for "
                                             "HSM NVRAM) and fix the fleet's hsm-proxies; refuses to overwrite one")
    ist.add_argument("--hsm-id", required=True, help="this hsm-proxy's id, one of the member set's")
    ist.add_argument("--member-set", type=Path, required=True,
                     help="the signed member set fleet-init fixed in the token (serve checks it is that one)")
    lh = sub.add_parser("log-heads", help="print the log head this hsm-proxy captured for each island (JSON)")
    for p in (ist, lh):
        p.add_argument("--state-file", default=os.environ.get("BKV_HSM_STATE_FILE", "hsm-state.json"),
                       help="the state file (default $BKV_HSM_STATE_FILE)")
    evc = sub.add_parser("evidence", help="the deployment evidence of this token's fleet: signed by the fleet key "
                                          "in the token and by the operator (settings from BKV_HSM_*)")
    evc.add_argument("--bundle", type=Path, required=True, help="the bundle that introduced this fleet (JSON)")
    evc.add_argument("--operator-key", type=Path, required=True)
    evc.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    if args.cmd in ("publish-bundle", "resign-bundle"):
        import time

        from bkv_protocol import bundle as bd
        from bkv_hsm_proxy.bundles import PublishError, current_bundle, fleet_entry, publish_bundle, same_fleets

        now = int(time.time())
        try:
            if args.cmd == "publish-bundle":
                if len(args.fleet_params) != len(args.edge_public_key):
                    parser.error("give one --edge-public-key per --fleet-params")
                fleets = [fleet_entry(p, e, args.valid_days, now)
                          for p, e in zip(args.fleet_params, args.edge_public_key)]
            else:
                fleets = same_fleets
                if args.min_age_hours > 0:
                    cur = current_bundle(args.etcd_endpoints, args.etcd_prefix)
                    if cur is not None and now - cur.bundle.issued_at < args.min_age_hours * 3600:
                        print(json.dumps({"sequence": cur.bundle.sequence, "resigned": False}))
                        return 0
            out = publish_bundle(args.etcd_endpoints, args.etcd_prefix, bd.load_root_key(args.operator_key),
                                 args.witness_url, fleets, now, int(args.expires_in_days * 86400))
        except (PublishError, bd.BundleError, OSError, ValueError) as exc:
            print(f"bkv-hsm-proxy: no bundle published: {exc}", file=sys.stderr)
            return 1
        b = out.bundle.bundle
        print(json.dumps({"sequence": b.sequence, "fleets": [f.fleet_id for f in b.fleets], "issued_at": b.issued_at,
                          "expires_at": b.expires_at, "finished_pending": list(out.finished)}))
        return 0

    if args.cmd == "publish-configmap":
        from bkv_protocol.retry import DeadlineExceeded
        from bkv_hsm_proxy.kube import PublishError, publish_configmap

        try:
            data = publish_configmap(args.params, args.name, edge_public_key_file=args.edge_public_key_file,
                                     serviceaccount_dir=args.serviceaccount_dir)
        except (PublishError, OSError, DeadlineExceeded) as exc:
            print(f"bkv-hsm-proxy: cannot publish the fleet ConfigMap: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"configmap": args.name, "fleet_id": data["fleet_id"]}))
        return 0

    if args.cmd == "sign-islands":  # offline: the admin key only
        from bkv_protocol import bundle as bd
        from bkv_protocol import islands as isl

        try:
            key = bd.load_root_key(args.admin_key)
            signed = isl.sign(isl.IslandSet.of(args.islands.split(","), args.epoch,
                                               args.previous.split(",") if args.previous else None), key)
            args.out.write_text(signed.to_json())
        except (isl.IslandSetError, OSError, ValueError) as exc:
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"epoch": signed.set.epoch, "islands": list(signed.set.islands),
                          "previous": None if signed.set.previous is None else list(signed.set.previous)}))
        return 0

    if args.cmd == "store-island-set":  # a client of the running hsm-proxies: no token, no PIN
        import asyncio

        from bkv_protocol import islands as isl
        from bkv_server.fleetmap import store_island_set
        from bkv_server.http import UpstreamError, UpstreamUnavailable

        try:
            text = sys.stdin.read() if str(args.island_set) == "-" else args.island_set.read_text()
            isl.SignedIslandSet.from_json(text)  # refused here already if it does not parse
            out = {url: {"epoch": got.epoch, "stored": got.stored}
                   for url, got in asyncio.run(store_island_set(args.hsm_url, text)).items()}
        except (isl.IslandSetError, OSError, UpstreamError, UpstreamUnavailable) as exc:
            print(f"bkv-hsm-proxy: island set not stored: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(out))
        return 0

    if args.cmd in ("admin-key", "sign-members", "sign-freeze"):  # offline: the admin key only
        from bkv_protocol import bundle as bd
        from bkv_protocol import members as ms

        try:
            if args.cmd == "admin-key":
                key = bd.new_root_key_file(args.out)  # never overwrites a key
                print(json.dumps({"admin_public_key": bd.public_key_b64(key), "key_file": str(args.out)}))
                return 0
            if args.cmd == "sign-freeze":
                args.out.write_text(ms.sign_freeze(args.epoch, bd.load_root_key(args.admin_key)).to_json())
                print(json.dumps({"freeze_epoch": args.epoch}))
                return 0
            from bkv_hsm_proxy.membership import newest_frozen

            freezes = _freezes(args.freezes)
            signed = ms.sign(ms.MemberSet.of(args.members.split(","), args.epoch, newest_frozen(freezes)),
                             bd.load_root_key(args.admin_key))
            args.out.write_text(signed.to_json())
        except (ms.MemberSetError, OSError, ValueError) as exc:
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"epoch": signed.set.epoch, "members": list(signed.set.members),
                          "admin_public_key": bd.public_key_b64(bd.load_root_key(args.admin_key))}))
        return 0

    if args.cmd == "freeze":  # a client of the running hsm-proxy: no token, no PIN
        from bkv_protocol import hsm_api
        from bkv_protocol import members as ms
        from bkv_server.http import ServiceClient, UpstreamError, UpstreamUnavailable

        async def freeze() -> hsm_api.FreezeOut:
            order = ms.FreezeOrder.from_json(sys.stdin.buffer.read() if str(args.order) == "-"
                                             else args.order.read_bytes())
            client = ServiceClient("hsm-proxy", [args.hsm_url])
            try:
                return await client.call("POST", "/hsm/v1/members/freeze", hsm_api.FreezeIn(
                    epoch=order.epoch, admin_public_key=order.admin_public_key, signature=order.signature),
                    hsm_api.FreezeOut, idempotent=True)
            finally:
                await client.aclose()

        import asyncio

        try:
            print(asyncio.run(freeze()).model_dump_json())
        except (ms.MemberSetError, OSError, UpstreamError, UpstreamUnavailable) as exc:
            print(f"bkv-hsm-proxy: not frozen: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.cmd in ("init-state", "log-heads"):  # the state file only: no token, no PIN
        from bkv_protocol import members as ms
        from bkv_hsm_proxy import nvram

        try:
            if args.cmd == "init-state":
                signed = ms.SignedMemberSet.from_json(args.member_set.read_bytes())
                identity = nvram.init_state(args.state_file, args.hsm_id, signed.set)
                print(json.dumps({"state_file": args.state_file, "hsm": identity.hsm, "epoch": identity.epoch}))
                return 0
            state, identity = nvram.open_state(args.state_file)
        except (nvram.StateFileError, ValueError, OSError) as exc:
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"hsm": identity.hsm, "members": list(identity.members), "epoch": identity.epoch,
                          "frozen": state.frozen, "heads": {i: {"index": h.index, "mac": h.mac.hex()}
                                    for i, h in sorted(state.durable_heads().items())}}))
        return 0

    from pydantic import ValidationError

    from bkv_protocol.retry import DeadlineExceeded
    from bkv_hsm_proxy.errors import HsmError
    from bkv_hsm_proxy.settings import HsmProxySettings

    try:
        settings = HsmProxySettings()
    except ValidationError as exc:
        print(f"bkv-hsm-proxy: bad settings: {exc}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "evidence":
            from bkv_protocol import bundle as bd
            from bkv_hsm_proxy.evidence import make_evidence, write

            try:
                write(make_evidence(settings, args.bundle.read_text(), bd.load_root_key(args.operator_key)), args.out)
            except (bd.BundleError, OSError, ValueError) as exc:
                print(f"bkv-hsm-proxy: no evidence: {exc}", file=sys.stderr)
                return 1
            return 0
        if args.cmd == "fleet-init":
            from bkv_protocol import islands as isl
            from bkv_protocol import members as ms
            from bkv_protocol.encoding import b64d
            from bkv_hsm_proxy.errors import IslandSetRefused
            from bkv_hsm_proxy.fleet_init import fleet_init
            from bkv_hsm_proxy.membership import MembersFixed

            try:
                island_set = isl.SignedIslandSet.from_json(args.island_set.read_bytes()) if args.island_set else None
                signed = ms.SignedMemberSet.from_json(args.member_set.read_bytes()) if args.member_set else None
                if args.hsm_members and signed is None:
                    raise MembersFixed("--hsm-members checks a signed set: give it with --member-set")
                if args.hsm_members and ms.MemberSet.of(args.hsm_members.split(",")).members != signed.set.members:
                    raise MembersFixed(f"the signed member set does not name exactly {args.hsm_members}: sign the "
                                       "set this deployment runs (`bkv-hsm-proxy sign-members`)")
                params = fleet_init(settings, args.out, new_generation=args.new_generation,
                                    admin_public_key=b64d(args.admin_public_key) if args.admin_public_key else None,
                                    member_set=signed, island_set=island_set)
            except (MembersFixed, IslandSetRefused, ms.MemberSetError, OSError, ValueError) as exc:
                print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({k: params[k] for k in ("fleet_id", "fleet_public_key", "max_attempts", "created")}))
            return 0
        if args.cmd == "change-members":
            from bkv_protocol import members as ms
            from bkv_hsm_proxy import membership, nvram
            from bkv_hsm_proxy.core import VaultHsm
            from bkv_hsm_proxy.hsm import open_token

            try:
                signed, freezes = _set_and_freezes(args)
            except (ms.MemberSetError, OSError, ValueError) as exc:
                print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
                return 1
            hsm = open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
            try:
                identity = membership.change_members(
                    hsm, VaultHsm(hsm, max_attempts=settings.max_attempts).log_key, settings.state_file, args.hsm_id,
                    signed, freezes, membership.read_chain(settings.etcd_endpoints, settings.etcd_prefix))
            except (membership.MembersFixed, nvram.StateFileError, OSError) as exc:
                print(f"bkv-hsm-proxy: member set not changed: {exc}", file=sys.stderr)
                return 1
            finally:
                hsm.close()
            print(json.dumps({"hsm": identity.hsm, "members": list(identity.members), "epoch": identity.epoch}))
            return 0
        if args.cmd == "retire-fleet":
            from bkv_hsm_proxy.fleet_init import RetireRefused, retire_fleet

            try:
                params = retire_fleet(settings, args.fleet_id)
            except RetireRefused as exc:
                print(f"bkv-hsm-proxy: not retired: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({"retired": args.fleet_id, "fleet_id": params["fleet_id"]}))
            return 0
        return _serve(settings, args)
    except HsmError as exc:
        print(f"bkv-hsm-proxy: HSM error: {exc}", file=sys.stderr)
        return 3
    except DeadlineExceeded as exc:
        print(f"bkv-hsm-proxy: HSM error: {exc.__cause__}", file=sys.stderr)
        return 3


def _freezes(paths: list[Path]) -> list:
    """Freeze statements (``bkv-hsm-proxy freeze`` output), parsed."""
    from bkv_protocol import hsm_api

    return [hsm_api.FreezeOut.model_validate_json(f.read_bytes()) for f in paths]


def _set_and_freezes(args: argparse.Namespace):
    """``--member-set`` and ``--freezes`` (change-members, start), parsed."""
    from bkv_protocol import members as ms

    return ms.SignedMemberSet.from_json(args.member_set.read_bytes()), _freezes(args.freezes)


def _serve(settings, args: argparse.Namespace) -> int:
    """``serve``, and ``start`` (the state file made or its set adopted first, in
    this process: the state file's lock is held from before that until exit)."""
    from bkv_hsm_proxy import membership, nvram
    from bkv_hsm_proxy.core import VaultHsm
    from bkv_hsm_proxy.hsm import open_token

    try:
        lock = nvram.hold(settings.state_file)  # held while this process serves
    except (nvram.StateFileError, OSError) as exc:
        print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
        return 4
    if nvram.upgrade_state(settings.state_file):  # an upgrade from a build before birth ids
        print(f"bkv-hsm-proxy: state file {settings.state_file} upgraded to format {nvram.FORMAT}", file=sys.stderr)
    hsm = None
    if args.cmd == "start":
        from bkv_protocol import members as ms

        try:
            signed, freezes = _set_and_freezes(args)
        except (ms.MemberSetError, OSError, ValueError) as exc:
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 1
        from bkv_hsm_proxy.fleet_init import TokenNotInitialized, wait_for_fleet_init

        pin = settings.user_pin.get_secret_value()
        try:
            hsm = wait_for_fleet_init(
                lambda rescan: open_token(settings.pkcs11_module, settings.token_label, pin, rescan=rescan),
                args.wait_for_fleet_init, say=lambda m: print(m, file=sys.stderr))
        except TokenNotInitialized as exc:
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 4
        try:
            done = membership.start(hsm, lambda: VaultHsm(hsm, max_attempts=settings.max_attempts).log_key,
                                    settings.state_file, args.hsm_id, signed, freezes,
                                    membership.read_chain(settings.etcd_endpoints, settings.etcd_prefix))
        except membership.ChangeRefused as exc:
            print(f"bkv-hsm-proxy: member set not changed: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:  # not one of the set's hsm-proxies
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 1
        except (membership.MembersFixed, nvram.StateFileError, OSError) as exc:
            print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
            return 4
        print(f"bkv-hsm-proxy: state file {done} ({args.hsm_id}, epoch {signed.set.epoch})", file=sys.stderr)
    try:
        state, identity = nvram.open_state(settings.state_file)
    except (nvram.StateFileError, OSError) as exc:
        print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
        return 4
    from bkv_server.service import run
    from bkv_hsm_proxy.app import create_app

    hsm = hsm or open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        membership.check_members(hsm, identity)
        membership.check_born(hsm, identity)  # after the set: a file naming another set is refused as such
    except membership.MembersFixed as exc:
        print(f"bkv-hsm-proxy: {exc}", file=sys.stderr)
        return 4
    vault = VaultHsm(hsm, max_attempts=settings.max_attempts)
    vault.attach_log(state, identity.hsm, list(identity.members), identity.epoch)
    run(create_app(vault), settings.host, settings.port, settings.metrics_port)
    os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
