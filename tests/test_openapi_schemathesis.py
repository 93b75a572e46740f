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

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from conftest import unique_user

pytestmark = pytest.mark.fleet

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection", "unsupported_method"]
SEED = 160016
EXAMPLES = 30  # per operation in the fuzzing phase (the coverage phase adds its boundary cases)
TIME_BOUND_S = 110


def run_schemathesis(url: str, token: str) -> tuple[list[str], dict[str, int], set[str], float]:
    """One bounded run through schemathesis's engine (what its CLI runs; its
    pytest loader does not work with this pytest). Returns the failures
    found, how many times each check ran, the operations called, and the time."""
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


def test_schemathesis_finds_nothing_the_schema_does_not_document(fleet):
    # One fresh account, so the state-changing calls touch nobody else's record.
    token = fleet.issuer().mint(unique_user("schemathesis"))
    failures, ran, called, took = run_schemathesis(fleet.frontend_url, token)
    assert not failures, f"{len(failures)} finding(s):\n" + "\n\n".join(dict.fromkeys(failures))
    # It really tested: every public operation, every check, within the bound.
    assert called >= {"GET /v1/fleet", "POST /v1/registration/start", "POST /v1/registration/finish",
                      "POST /v1/recovery/start", "POST /v1/recovery/finish", "DELETE /v1/record"}, called
    assert set(CHECKS) <= set(ran), ran
    assert took < TIME_BOUND_S
