"""Unit tests: the JSON schema published for base64 fields and the decoder
that validates them accept exactly the same strings (schemathesis sends
what the schema forbids and expects a refusal, and what it allows)."""

from __future__ import annotations

import random
import re

import pytest
from pydantic import TypeAdapter, ValidationError

from bkv_protocol.wire import B64, RequestId, fixed_b64

FIELDS = {"any size": B64, "request_id (16 B)": RequestId, "ek (48 B)": fixed_b64(48), "k_nonce (12 B)": fixed_b64(12)}
TRICKY = ["", "=", "==", "QQ==", "QR==", "QQ=", "Q===", "QUI=", "QUJD", "QQ==QQ==", "QU=I", "Q", "QUJDRA", "QQ==\n",
          "\nQQ==", "QU JD", "QUJD\x00", "QUJD-_==", "A" * 5464, "A" * 5468, "A" * 24, "A" * 22 + "==", "A" * 64,
          "A" * 16, "A" * 63 + "=", "QUJ\u00e9", "\u0660\u0661==", "QUJD===="]


def _by_schema(schema: dict, value: str) -> bool:
    # JSON schema patterns search (ECMA-262: `$` is the end of the text);
    # Python's `$` also matches before a final newline, so use \Z.
    pattern = schema["pattern"].removesuffix("$") + r"\Z"
    return (re.search(pattern, value) is not None and len(value) <= schema["maxLength"]
            and len(value) >= schema.get("minLength", 0))


def _by_decoder(adapter: TypeAdapter, value: str) -> bool:
    try:
        adapter.validate_python(value)
        return True
    except ValidationError:
        return False


def _samples() -> list[str]:
    rng = random.Random(16)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = list(TRICKY)
    for _ in range(3000):
        n = rng.choice([rng.randrange(0, 30), 16, 22, 24, 64, 66, 68])
        s = "".join(rng.choice(alphabet) for _ in range(n))
        if rng.random() < 0.5:
            s = s[: max(0, len(s) - rng.randrange(0, 3))] + "=" * rng.randrange(0, 3)
        if rng.random() < 0.05:
            s += rng.choice(["\n", " ", "-", "_", "."])
        out.append(s)
    return out


@pytest.mark.parametrize("name", FIELDS)
def test_the_published_base64_schema_and_the_decoder_accept_the_same_strings(name):
    adapter = TypeAdapter(FIELDS[name])
    schema = adapter.json_schema()
    disagree = [v for v in _samples() if _by_schema(schema, v) != _by_decoder(adapter, v)]
    assert not disagree, disagree[:5]
    assert any(_by_decoder(adapter, v) for v in _samples())  # not vacuous


def test_fixed_size_fields_publish_their_encoded_length():
    assert TypeAdapter(fixed_b64(48)).json_schema()["minLength"] == 64
    assert TypeAdapter(fixed_b64(12)).json_schema()["maxLength"] == 16
    assert TypeAdapter(RequestId).json_schema()["pattern"] == "^[A-Za-z0-9+/]{22}==$"
