"""Issue #15 item 6: bad input is a 4xx with a stable code at every tier,
never a 500 -- token claims of the wrong type, integers past u64, ids with a
trailing newline -- against the real processes of the session fleet, plus a
bounded sweep of malformed bodies over every hsm-proxy, island and frontend
route (hypothesis is not installed: a seeded loop)."""

from __future__ import annotations

import base64
import json
import os
import random
import sys
import time

import httpx
import jwt
import pytest
from pydantic import TypeAdapter, ValidationError

from bkv_protocol.encoding import fleet_id_for, user_ref
from conftest import unique_user
from support import procs

B = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
U64 = 2**64
MAX_VERSION = 2**63 - 1


def _urls(fleet) -> tuple[str, str]:
    island = next(p for n, p in fleet.procs.items() if n.startswith("island"))
    hsm = next(p for n, p in fleet.procs.items() if n.startswith("hsm-proxy"))
    return f"http://{island.host}:{island.port}", f"http://{hsm.host}:{hsm.port}"


def _island_id(fleet) -> str:
    return next(p for n, p in fleet.procs.items() if n.startswith("island")).env["BKV_ISLAND_ISLAND_ID"]


def mint(fleet, **overrides) -> str:
    """A token signed by the fleet's own issuer key, with any claims at all
    (DevIssuer.mint refuses bad ones, which is the point of these tests)."""
    issuer = fleet.issuer()
    now = int(time.time())
    claims = {"iss": issuer.issuer, "aud": issuer.audience, "sub": unique_user("n500"), "iat": now,
              "exp": now + 600, **overrides}
    claims = {k: v for k, v in claims.items() if v is not _DROP}
    # Signed as raw JSON: jwt.encode itself refuses some of the claims tested here.
    return jwt.api_jws.encode(json.dumps(claims).encode(), issuer._key, algorithm="EdDSA")  # noqa: SLF001


_DROP = object()


def _post(url: str, body, *, headers=None, raw: bytes | None = None) -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url, content=content, headers=h, timeout=30.0)


def assert_4xx(resp: httpx.Response, code: str | None = None) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err


# -- the frontend: every claim it reads is type-checked ------------------------------

BAD_CLAIMS = [
    ("cnf a string", {"cnf": "device"}),
    ("cnf a number", {"cnf": 5}),
    ("cnf a list", {"cnf": ["bkv_device_key"]}),
    ("cnf true", {"cnf": True}),
    ("device key a number", {"cnf": {"bkv_device_key": 5}}),
    ("device key an object", {"cnf": {"bkv_device_key": {"k": "v"}}}),
    ("device key empty", {"cnf": {"bkv_device_key": ""}}),
    ("device key huge", {"cnf": {"bkv_device_key": "A" * 5000}}),
    ("sub a number", {"sub": 12345}),
    ("sub a list", {"sub": ["alice"]}),
    ("sub with a trailing newline", {"sub": "alice\n"}),
    ("sub empty", {"sub": ""}),
    ("sub too long", {"sub": "a" * 129}),
    ("sub unicode", {"sub": "ålice"}),
    ("exp a numeric string", {"exp": str(int(time.time()) + 600)}),
    ("exp a float", {"exp": time.time() + 600.5}),
    ("exp true", {"exp": True}),
    ("exp past 2^63", {"exp": 2**70}),
    ("exp infinite", {"exp": float("inf")}),
    ("exp an object", {"exp": {"t": 1}}),
    ("exp missing", {"exp": _DROP}),
    ("iat a string", {"iat": "yesterday"}),
    ("iat null", {"iat": None}),
    ("iat a float", {"iat": time.time()}),
    ("nbf a string", {"nbf": "1"}),
    ("nbf a list", {"nbf": [1]}),
    ("aud a number", {"aud": 5}),
    ("aud a list of numbers", {"aud": [5, None]}),
    ("iss an object", {"iss": {"name": "bkv-dev-issuer"}}),
]


@pytest.mark.parametrize("overrides", [c[1] for c in BAD_CLAIMS], ids=[c[0] for c in BAD_CLAIMS])
def test_a_signed_token_with_a_claim_of_the_wrong_type_is_a_401_not_a_500(fleet, overrides):
    token = mint(fleet, **overrides)
    # Twice: the second is answered from the verified-token cache, where a
    # string exp used to blow up (`"123" + 30`).
    for _ in range(2):
        resp = _post(fleet.frontend_url + "/v1/recover/start", {"request_id": B(os.urandom(16)), "credential_request": B(b"x" * 96)},
                     headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "unauthenticated"
    # The FastAPI routes use the same check.
    resp = httpx.delete(fleet.frontend_url + "/v1/record", headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"


@pytest.mark.parametrize("payload", [b"[1, 2]", b"\"alice\"", b"null", b"{" * 3000 + b"}" * 3000, b"\xff\xfe"])
def test_a_signed_token_whose_payload_is_not_an_object_is_a_401(fleet, payload):
    token = jwt.api_jws.encode(payload, fleet.issuer()._key, algorithm="EdDSA")  # noqa: SLF001
    resp = _post(fleet.frontend_url + "/v1/recover/start", {"request_id": B(os.urandom(16)), "credential_request": B(b"x" * 96)},
                 headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"


def test_a_well_typed_token_still_works(fleet):
    """The checks above refuse only wrong types: a plain token reaches the island (no record: 404)."""
    resp = _post(fleet.frontend_url + "/v1/recover/start", {"request_id": B(os.urandom(16)), "credential_request": B(b"x" * 96)},
                 headers={"authorization": f"Bearer {mint(fleet)}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_record"


@pytest.mark.parametrize("header", [b"\xc3\xa9t\xc3\xa9", b"\xff" * 44, b"plain-ascii-key"])
def test_a_non_ascii_device_key_in_header_or_token_is_a_401_not_a_500(fleet, header):
    # compare_digest refuses non-ASCII str with a TypeError: the frontend compares bytes. The
    # token's key is non-ASCII too, so even a plain header used to fail.
    token = mint(fleet, cnf={"bkv_device_key": "ß" + B(os.urandom(32))})
    resp = _post(fleet.frontend_url + "/v1/recover/start", {"request_id": B(os.urandom(16)), "credential_request": B(b"x" * 96)},
                 headers={"authorization": f"Bearer {token}", "x-bkv-device-key": header})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"


def test_a_bound_token_with_the_matching_header_passes_the_device_check(fleet):
    key = B(os.urandom(32))
    resp = _post(fleet.frontend_url + "/v1/recover/start", {"request_id": B(os.urandom(16)), "credential_request": B(b"x" * 96)},
                 headers={"authorization": f"Bearer {mint(fleet, cnf={'bkv_device_key': key})}",
                          "x-bkv-device-key": key})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_record"


def test_the_dev_issuer_refuses_to_mint_an_id_with_a_trailing_newline(fleet):
    with pytest.raises(ValueError):
        fleet.issuer().mint("alice\n")


# -- integers past what the HSM packs -------------------------------------------------


def _genesis(fleet) -> dict:
    _, hsm = _urls(fleet)
    return httpx.post(hsm + "/hsm/v1/log/genesis", json={"island": _island_id(fleet)}, timeout=30).json()


def _apply(fleet, kind: str, body: dict) -> dict:
    """One op for the hsm-proxy's log (every state change goes through it)."""
    return {"head": _genesis(fleet), "ops": [{"kind": kind, "proof": B(b"\x00\x00\x00"), kind: body}]}


def _hsm_registration_start(fleet, version) -> dict:
    return {"user_id": unique_user("big"), "island": _island_id(fleet),
            "current": {"state": "absent", "version": version}, "registration_request": B(os.urandom(32))}


@pytest.mark.parametrize("version", [U64, U64 + 1, 2**63, 10**40, -1, -(2**63)])
def test_an_entry_version_outside_u64_with_room_for_one_is_a_400_at_the_hsm_proxy(fleet, version):
    _, hsm = _urls(fleet)
    body = _hsm_registration_start(fleet, version)
    assert_4xx(_post(hsm + "/hsm/v1/registration/start", body), "invalid_request")
    body["credential_request"] = body.pop("registration_request")
    body["request_id"] = B(os.urandom(16))
    assert_4xx(_post(hsm + "/hsm/v1/log/apply", _apply(fleet, "recover_start", body)), "invalid_request")


def test_the_largest_entry_version_is_a_4xx_too_because_the_next_one_would_not_fit(fleet):
    _, hsm = _urls(fleet)
    body = {"user_id": unique_user("big"), "island": _island_id(fleet),
            "current": {"state": "absent", "version": MAX_VERSION}, "challenge": B(os.urandom(60)),
            "registration_upload": B(os.urandom(192)), "ek": B(os.urandom(48)), "k_nonce": B(os.urandom(12))}
    body["request_id"] = B(os.urandom(16))
    resp = _post(hsm + "/hsm/v1/log/apply", _apply(fleet, "registration_finish", body))
    if resp.status_code == 200:  # refused as an op: nothing applied, a 4xx for that op
        (result,) = resp.json()["results"]
        assert resp.json()["entry"] is None and 400 <= result["status"] < 500, result
    else:
        assert_4xx(resp)


def test_a_version_in_exponent_notation_is_refused(fleet):
    _, hsm = _urls(fleet)
    raw = json.dumps(_hsm_registration_start(fleet, 0)).replace('"version": 0', '"version": 1e400').encode()
    assert_4xx(_post(hsm + "/hsm/v1/registration/start", None, raw=raw), "invalid_request")


def test_a_version_of_five_thousand_digits_is_refused(fleet):
    _, hsm = _urls(fleet)
    raw = json.dumps(_hsm_registration_start(fleet, 0)).replace('"version": 0', '"version": ' + "9" * 5000).encode()
    assert_4xx(_post(hsm + "/hsm/v1/registration/start", None, raw=raw), "invalid_request")


def test_a_content_length_of_five_thousand_digits_is_not_a_500(fleet):
    """Python's int() refuses strings past 4300 digits (ValueError): the guard must not get that far."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(fleet.frontend_url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/recover/start HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + b"9" * 5000 + b"\r\n\r\n{}")
        head = sock.recv(64)
    assert head.startswith(b"HTTP/1.1 4"), head


@pytest.mark.parametrize("bundle", [
    "[" * 20000 + "]" * 20000,
    # Well formed but for the sequence, which the signatures cover as a u64.
    json.dumps({"bundle": {"format_version": 1, "sequence": U64, "prev_hash": B(b"\1" * 32), "issued_at": 1,
                           "fleets": [{"fleet_id": fleet_id_for(b"key"), "fleet_public_key": B(b"key"),
                                       "edge_public_key": B(bytes(32)), "not_before": 0, "not_after": 1}]},
                "operator_signature": B(bytes(64))}),
    json.dumps({"bundle": {"format_version": 1, "sequence": 1, "prev_hash": B(bytes(32)), "issued_at": 1,
                           "fleets": [{"fleet_id": ["a"], "fleet_public_key": "", "edge_public_key": "",
                                       "not_before": 0, "not_after": 1}]}, "operator_signature": ""}),
    json.dumps([1, 2]),
], ids=["deep nesting", "sequence past u64", "fleet id a list", "a list"])
def test_the_witness_refuses_a_malformed_bundle_with_a_400(fleet, bundle):
    resp = _post(fleet.witness_url + "/witness/v1/countersign", {"bundle": bundle})
    assert_4xx(resp, "invalid_request")


def test_attempt_counts_are_bounded_in_the_wire_models():
    from bkv_protocol import hsm_api as hapi
    from bkv_protocol import island_api as iapi

    for bad in (-1, 1001, U64):
        with pytest.raises(ValidationError):
            iapi.RecoverStartOut(credential_response=b"r", login_state=b"s", attempts_left=bad, signature=b"g")
        with pytest.raises(ValidationError):
            hapi.FleetParams(fleet_id="f", fleet_public_key=b"k", max_attempts=bad if bad != -1 else 0)
    with pytest.raises(ValidationError):
        iapi.RegistrationFinishOut(version=2**63, max_attempts=10, signature=b"g")
    assert iapi.RegistrationFinishOut(version=MAX_VERSION, max_attempts=1000, signature=b"g").version == MAX_VERSION


# -- ids with a trailing newline, at every API ----------------------------------------

NL = "\n"


def test_every_id_type_refuses_a_trailing_newline_and_any_other_junk():
    """pydantic-core's Rust regex reads `$` as the end of the text (Python's
    re does not): this pins that, for every id pattern of the wire models."""
    from bkv_protocol.hsm_api import FleetId, IslandId, UserId, UserRef

    good = {UserId: "alice", IslandId: "island-a", UserRef: "ab" * 32, FleetId: "cd" * 16}
    for typ, value in good.items():
        ta = TypeAdapter(typ)
        assert ta.validate_python(value) == value
        for bad in (value + NL, value + "\r\n", NL + value, value + "\x00", value + " ", " " + value, ""):
            with pytest.raises(ValidationError):
                ta.validate_python(bad)


def test_a_user_id_with_a_trailing_newline_is_refused_by_the_frontend_first(fleet):
    token = mint(fleet, sub="alice" + NL)
    resp = _post(fleet.frontend_url + "/v1/registration/start", {"registration_request": B(os.urandom(32))},
                 headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"


RID = B(os.urandom(16))


def test_ids_with_a_trailing_newline_are_refused_by_the_island(fleet):
    island, _ = _urls(fleet)
    fid = fleet.fleet_params["fleet_id"]
    cases = [
        ("/island/v1/login/start", {"user_id": "alice" + NL, "request_id": RID, "credential_request": B(b"x" * 96)}),
        ("/island/v1/login/start", {"user_id": "alice", "fleet_id": fid + NL, "request_id": RID,
                                       "credential_request": B(b"x")}),
        ("/island/v1/login/start", {"user_id": "alice", "request_id": RID + NL, "credential_request": B(b"x")}),
        ("/island/v1/record/delete", {"user_id": unique_user("nl") + NL, "request_id": RID,
                                      "ticket": B(b"t"), "ticket_proof": B(b"p" * 32)}),
        ("/island/v1/admin/move", {"user_ref": user_ref("alice") + NL, "to_island": "island-b"}),
        ("/island/v1/admin/move", {"user_ref": user_ref("alice"), "to_island": "island-b" + NL}),
        ("/island/v1/admin/migrate", {"user_ref": user_ref("alice"), "to_fleet": fid + NL}),
    ]
    for path, body in cases:
        assert_4xx(_post(island + path, body), "invalid_request")


def test_ids_with_a_trailing_newline_are_refused_by_the_hsm_proxy(fleet):
    _, hsm = _urls(fleet)
    isl, fid = _island_id(fleet), fleet.fleet_params["fleet_id"]
    current = {"state": "absent", "version": 0}
    start = {"user_id": "alice", "island": isl, "current": current, "registration_request": B(os.urandom(32))}
    cases = [
        ("/hsm/v1/registration/start", {**start, "user_id": "alice" + NL}),
        ("/hsm/v1/registration/start", {**start, "island": isl + NL}),
        ("/hsm/v1/registration/start", {**start, "fleet_id": fid + NL}),
        ("/hsm/v1/registration/start", {**start, "current": {**current, "fleet_id": fid + NL}}),
        ("/hsm/v1/log/apply", _apply(fleet, "move_out", {"user_ref": user_ref("alice") + NL, "island": isl,
                                                         "to_island": "island-b", "current": current})),
        ("/hsm/v1/log/apply", _apply(fleet, "move_out", {"user_ref": user_ref("alice"), "island": isl,
                                                         "to_island": "island-b" + NL, "current": current})),
        ("/hsm/v1/log/apply", _apply(fleet, "migrate", {"user_ref": user_ref("alice"), "island": isl,
                                                        "current": current, "to_fleet": fid + NL})),
        ("/hsm/v1/log/genesis", {"island": isl + NL}),
    ]
    for path, body in cases:
        assert_4xx(_post(hsm + path, body), "invalid_request")


def test_island_admin_commands_refuse_ids_with_a_trailing_newline_before_touching_etcd():
    for argv in (["set-map", "island-a", "island-b" + NL], ["add-island", "island-c" + NL, "--island-sets", "a.json", "b.json"],
                 ["migrate-fleet", "ab" * 16 + NL]):
        # Nothing listens on this etcd: were the id accepted, the command would hang retrying, not exit 2.
        done = procs.run([sys.executable, "-m", "bkv_island", *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "BKV_ISLAND_ETCD_ENDPOINTS": "127.0.0.1:9"})
        assert done.returncode == 2 and "not a valid" in done.stderr, (argv, done.stderr)


def test_island_settings_refuse_a_replica_id_with_a_trailing_newline_or_a_slash(monkeypatch):
    from bkv_island.settings import IslandSettings

    base = {"island_id": "island-a", "hsm_urls": "http://127.0.0.1:1"}
    assert IslandSettings(**base, replica_id="island-a-0").replica_id == "island-a-0"
    for bad in ("island-a-0\n", "a/b", "", "Island-A", "-a", "a" * 254):
        with pytest.raises(ValidationError):
            IslandSettings(**base, replica_id=bad)
    with pytest.raises(ValidationError):
        IslandSettings(**{**base, "island_id": "island-a\n"}, replica_id="r0")


def test_no_python_regex_in_the_services_is_anchored_with_a_dollar():
    """Python's `$` matches before a trailing newline: ids are checked with
    fullmatch (or pydantic patterns, whose Rust engine reads `$` as the end)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    call = re.compile(r"re\.(compile|match|search)\(\s*r?[\"']([^\"']*)[\"']")
    offenders = []
    for path in [*root.joinpath("services").rglob("*.py"), *root.joinpath("src", "bkv_common").rglob("*.py")]:
        for m in call.finditer(path.read_text()):
            if m.group(2).endswith("$"):
                offenders.append(f"{path.relative_to(root)}: {m.group(0)}")
    assert not offenders, offenders


# -- a seeded sweep of malformed bodies over every route ------------------------------

BAD_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, U64, -(2**63) - 1, 10**100, 1.5, -0.0, 1e308,
    "", "\n", "é", "\u202e\u0000", "😀" * 40, "A" * 9000, "AAAA\n", "alice\n", "%%%", [], [1, "a", None],
    {}, {"state": "live"}, {"a": {"b": {"c": [1, {"d": None}]}}},
]
RAW_BODIES = [
    b"", b"null", b"[]", b"\"x\"", b"1", b"{", b"{\"a\":1,}", b"[" * 20000 + b"]" * 20000,
    b"{\"x\":" * 5000 + b"1" + b"}" * 5000, b"1" + b"0" * 5000, b"\xff\xfe\x00", b"{\"\\ud800\": 1}",
]
SWEEP_SEED = 15
SWEEP_PER_ROUTE = 30


def _nested(depth: int):
    v = 1
    for _ in range(depth):
        v = {"k": [v]}
    return v


def _hsm_routes(fleet) -> dict[str, dict]:
    isl, fid = _island_id(fleet), fleet.fleet_params["fleet_id"]
    cur = {"state": "absent", "version": 0}
    who = {"user_id": unique_user("sw"), "island": isl, "fleet_id": fid, "current": cur}
    head = _genesis(fleet)
    rid = {"request_id": B(os.urandom(16))}
    statement = {"hsm": "hsm-0", "island": isl, "index": 0, "mac": head["mac"], "tag": head["mac"]}
    return {
        "/hsm/v1/registration/start": {**who, "registration_request": B(os.urandom(32))},
        "/hsm/v1/log/genesis": {"island": isl},
        "/hsm/v1/log/apply": _apply(fleet, "recover_start", {**who, **rid, "credential_request": B(os.urandom(96))}),
        "/hsm/v1/log/capture": {"entries": [head], "release": {"statements": [statement], "held": [B(os.urandom(60))]}},
        "/hsm/v1/log/release": {"entry": head, "statements": [statement], "held": [B(os.urandom(60))]},
        "/hsm/v1/refusal": {**who, "proven": {"head": head, "proof": B(b"\x00\x00\x00")}, "statements": [statement],
                            "route": "login-start", **rid, "fields": [B(os.urandom(96))]},
        # Signed by no admin key: every mutation is refused, none freezes the shared fleet.
        "/hsm/v1/members/freeze": {"epoch": 1, "admin_public_key": B(os.urandom(32)), "signature": B(os.urandom(64))},
        "/hsm/v1/reply/open": {**{k: who[k] for k in ("user_id", "island", "current")}, **rid,
                               "proven": {"head": head, "proof": B(b"\x00\x00\x00")}, "statements": [],
                               "fingerprint": B(os.urandom(32))},
    }


def _island_routes(fleet) -> dict[str, dict]:
    fid = fleet.fleet_params["fleet_id"]
    user = unique_user("sw")  # nobody: deleting or moving it changes nothing
    ref = user_ref(user)
    return {
        "/island/v1/registration/start": {"user_id": user, "fleet_id": fid, "registration_request": B(os.urandom(32))},
        "/island/v1/registration/finish": {"user_id": user, "challenge": B(os.urandom(60)),
                                           "registration_upload": B(os.urandom(192)), "ek": B(os.urandom(48)),
                                           "k_nonce": B(os.urandom(12))},
        "/island/v1/login/start": {"user_id": user, "credential_request": B(os.urandom(96))},
        "/island/v1/login/finish": {"user_id": user, "login_state": B(os.urandom(300)),
                                       "credential_finalization": B(os.urandom(64))},
        "/island/v1/record/delete": {"user_id": user, "ticket": B(os.urandom(80)), "ticket_proof": B(os.urandom(32))},
        "/island/v1/admin/move": {"user_ref": ref, "to_island": "island-b"},
        "/island/v1/admin/migrate": {"user_ref": ref, "to_fleet": fid},
        "/island/v1/admin/list-refs": {},
    }


def _frontend_routes(fleet) -> dict[str, dict]:
    fid = fleet.fleet_params["fleet_id"]
    return {
        "/v1/registration/start": {"fleet_id": fid, "registration_request": B(os.urandom(32))},
        "/v1/registration/finish": {"challenge": B(os.urandom(60)), "registration_upload": B(os.urandom(192)),
                                    "ek": B(os.urandom(48)), "k_nonce": B(os.urandom(12))},
        "/v1/recover/start": {"credential_request": B(os.urandom(96))},
        "/v1/recover/finish": {"login_state": B(os.urandom(300)), "credential_finalization": B(os.urandom(64))},
        "/v1/record/delete": {"ticket": B(os.urandom(80)), "ticket_proof": B(os.urandom(32))},
        "/v1/fleet": {},
    }


def _mutations(base: dict, rng: random.Random, n: int):
    """``n`` malformed variants of ``base``: one field (or one field of a nested
    object) replaced by a bad value, dropped, or joined by an unknown one; plus
    whole bodies that are not objects at all."""
    yield from ((None, raw) for raw in RAW_BODIES)
    paths = [(k,) for k in base] + [(k, sub) for k, v in base.items() if isinstance(v, dict) for sub in
                                    ("state", "version", "sealed", "fleet_id", "tag")]
    for _ in range(n):
        body = json.loads(json.dumps(base))
        kind = rng.random()
        if not paths or kind < 0.1:
            body[rng.choice(["é", "user_id", "x" * 300, "__proto__"])] = rng.choice(BAD_VALUES)
        else:
            path = rng.choice(paths)
            target = body
            for key in path[:-1]:
                target = target[key]
            if kind < 0.2:
                target.pop(path[-1], None)
            else:
                target[path[-1]] = _nested(rng.randrange(30, 200)) if kind > 0.95 else rng.choice(BAD_VALUES)
        yield body, None


def _sweep(url: str, routes: dict[str, dict], rng: random.Random, headers: dict[str, str],
           allowed_5xx: set[str] = frozenset()) -> int:
    sent = 0
    failures = []
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for path, base in routes.items():
            for body, raw in _mutations(base, rng, SWEEP_PER_ROUTE):
                content = raw if raw is not None else json.dumps(body).encode()
                resp = c.post(path, content=content, headers={"content-type": "application/json", **headers})
                sent += 1
                code = None
                try:
                    code = resp.json()["error"]["code"]
                except Exception:  # noqa: BLE001 - a 2xx, or not JSON: judged by status below
                    pass
                if resp.status_code >= 500 and code not in allowed_5xx:
                    failures.append((path, resp.status_code, code, content[:120]))
                elif resp.status_code >= 400:
                    assert code, (path, resp.status_code, resp.text[:200])  # a stable code on every 4xx
    assert not failures, failures[:5]
    return sent


def test_a_sweep_of_malformed_bodies_gets_no_500_from_the_hsm_proxy(fleet):
    _, hsm = _urls(fleet)
    rng = random.Random(SWEEP_SEED)
    # record_integrity_failure is the hsm-proxy's documented 500 for a sealed
    # record that does not open (tampered storage); the sweep only sends
    # absent entries, but a mutation may declare one live.
    sent = _sweep(hsm, _hsm_routes(fleet), rng, {}, {"record_integrity_failure"})
    assert sent >= 6 * SWEEP_PER_ROUTE


def test_a_sweep_of_malformed_bodies_gets_no_500_from_the_island(fleet):
    island, _ = _urls(fleet)
    sent = _sweep(island, _island_routes(fleet), random.Random(SWEEP_SEED + 1), {})
    assert sent >= 8 * SWEEP_PER_ROUTE


def test_a_sweep_of_malformed_bodies_gets_no_500_from_the_frontend(fleet):
    token = fleet.issuer().mint(unique_user("sw"))
    sent = _sweep(fleet.frontend_url, _frontend_routes(fleet), random.Random(SWEEP_SEED + 2),
                  {"authorization": f"Bearer {token}"})
    assert sent >= 6 * SWEEP_PER_ROUTE
