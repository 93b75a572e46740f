"""The published /openapi.json is the truth, as an API client finds it:
schemathesis reads the running frontend's schema, sends what it allows and
what it forbids (and methods it does not declare), and every answer must be
documented there -- status, content type, body schema, error code.

Checks run: not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance,
negative_data_rejection, unsupported_method. Not positive_data_acceptance:
a schema-valid body here is random bytes in the shape of OPAQUE messages,
challenges and login states, and the vault rightly refuses those (400
malformed_opaque_message / challenge_rejected / login_state_rejected, 404
no_record for an account with nothing registered) -- no schema can say which
bytes are a valid OPAQUE message or a challenge the HSM sealed.

Bounded and deterministic: a fixed seed, a few examples per operation, no
shrinking, no example database; the whole run takes well under two minutes.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events
from schemathesis.generation.meta import CoverageScenario

from conftest import unique_user

pytestmark = pytest.mark.fleet

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection", "unsupported_method"]
SEED = 160016
EXAMPLES = 30  # per operation in the fuzzing phase (the coverage phase adds its boundary cases)
TIME_BOUND_S = 90
UNDECLARED_METHOD = CoverageScenario.UNSPECIFIED_HTTP_METHOD


def run_schemathesis(url: str, token: str) -> tuple[list[str], dict[str, int], set[str], float]:
    """One bounded run through schemathesis's engine (what its CLI runs; its
    pytest loader does not work with this pytest). Returns the failures
    found, how many times each check ran (and how many negative and
    undeclared-method cases were sent), the operations called, and the time."""
    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        # A valid token, so the calls get past auth to validation and the vault.
        "headers": {"Authorization": f"Bearer {token}"},
        "request-timeout": 10,
        "generation": {"max-examples": EXAMPLES, "no-shrink": True, "database": "none", "mode": "all"},
        "phases": {"examples": {"enabled": False}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    })
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    failures: list[str] = []
    ran: dict[str, int] = {}
    called: set[str] = set()
    start = time.monotonic()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, (events.FatalError, events.NonFatalError)):
            failures.append(f"error: {getattr(event, 'value', None) or event.exception!r}")
        if isinstance(event, events.ScenarioFinished):
            called.add(event.recorder.label)
            for node in event.recorder.cases.values():
                meta = node.value.meta
                if meta is not None and meta.generation.mode.is_negative:
                    ran["negative cases"] = ran.get("negative cases", 0) + 1
                if meta is not None and getattr(meta.phase.data, "scenario", None) == UNDECLARED_METHOD:
                    ran["undeclared-method cases"] = ran.get("undeclared-method cases", 0) + 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    ran[check.name] = ran.get(check.name, 0) + 1
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        f = check.failure_info.failure
                        failures.append(f"{event.recorder.label} [{check.name}] {f.title}: {f.message}\n"
                                        f"{check.failure_info.code_sample}")
        if time.monotonic() - start > TIME_BOUND_S:
            failures.append(f"over the time bound of {TIME_BOUND_S} s")
            break
    return failures, ran, called, time.monotonic() - start


@pytest.mark.timeout(150)  # hard stop, should the engine hang past its own bound
def test_schemathesis_finds_nothing_the_schema_does_not_document(fleet):
    # One fresh account, so the state-changing calls touch nobody else's record.
    token = fleet.issuer().mint(unique_user("schemathesis"))
    failures, ran, called, took = run_schemathesis(fleet.frontend_url, token)
    assert not failures, f"{len(failures)} finding(s):\n" + "\n\n".join(dict.fromkeys(failures))
    # It really tested: every public operation, every check, within the bound.
    assert called >= {"GET /v1/fleet", "POST /v1/registration/start", "POST /v1/registration/finish",
                      "POST /v1/recover/start", "POST /v1/recover/finish", "DELETE /v1/record",
                      "POST /v1/record/delete", "GET /v1/bundle", "POST /v1/fleet"}, called
    assert set(CHECKS) <= set(ran), ran
    assert ran.get("negative cases", 0) > 0 and ran.get("undeclared-method cases", 0) > 0, ran
    assert took < TIME_BOUND_S


def test_the_schema_states_byte_lengths_patterns_and_error_codes_and_no_422(fleet):
    spec = httpx.get(fleet.frontend_url + "/openapi.json").json()
    assert not [(p, m) for p, item in spec["paths"].items() for m, op in item.items() if "422" in op["responses"]]
    props = spec["components"]["schemas"]["RegistrationFinishRequest"]["properties"]
    # Encoded lengths of 48, 12 and 16 bytes (standard base64, padded).
    assert (props["ek"]["minLength"], props["ek"]["maxLength"]) == (64, 64)
    assert (props["k_nonce"]["minLength"], props["k_nonce"]["maxLength"]) == (16, 16)
    assert (props["request_id"]["minLength"], props["request_id"]["pattern"]) == (24, "^[A-Za-z0-9+/]{22}==$")
    assert props["challenge"]["pattern"].startswith("^(?:[A-Za-z0-9+/]{4})*")
    assert props["fleet_id"]["anyOf"][0]["pattern"] == "^[0-9a-f]{32}$"
    finish = spec["paths"]["/v1/recover/finish"]["post"]
    assert finish["security"] == [{"bearerAuth": []}]
    code_enum = {status: r["content"]["application/json"]["schema"]["properties"]["error"]["properties"]["code"]["enum"]
                 for status, r in finish["responses"].items() if status != "200"}
    assert code_enum["403"] == ["authentication_failed"] and code_enum["410"] == ["record_destroyed"]
    assert set(code_enum["400"]) == {"invalid_request", "malformed_opaque_message", "login_state_rejected"}
    assert set(code_enum) == {"400", "401", "403", "404", "409", "410", "413", "415", "429", "500", "502", "503"}
    assert code_enum["429"] == ["rate_limited"]


_KNOWN = [("/v1/registration/start", "POST"),  # answered by the fast path
          ("/v1/record", "DELETE"),  # by FastAPI
          ("/v1/fleet", "GET, POST")]


@pytest.mark.parametrize("path, allow, method", [
    (path, allow, method) for path, allow in _KNOWN
    for method in ("PUT", "PATCH", "GET", "DELETE", "OPTIONS", "TRACE") if method not in allow.split(", ")])
def test_an_undeclared_method_on_a_known_path_is_405_with_allow_never_415(fleet, path, allow, method):
    # No JSON content type: the method is refused before the body is looked at.
    resp = httpx.request(method, fleet.frontend_url + path, content=b"x", headers={"content-type": "text/plain"})
    assert resp.status_code == 405
    assert resp.headers["allow"] == allow
    assert resp.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_an_unknown_path_stays_404_whatever_the_method(fleet, method):
    resp = httpx.request(method, fleet.frontend_url + "/v1/no-such-route", content=b"x",
                         headers={"content-type": "text/plain"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
