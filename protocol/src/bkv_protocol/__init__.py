"""The contract between the client and the services, in one package.

Identifiers and their patterns (``ids``), the public v1 models (``v1``) and
the internal hops' (``island_api``: frontend -> island, ``hsm_api``: island
-> hsm-proxy, ``witness_api``), every domain-separation label (``labels``),
canonical encoding (``encoding``), one function per signed message used by
signer and verifier alike (``transcripts``), the device's side of Noise
(``noise``), validation bundles, the witness log and deployment evidence
(``bundle``, ``evidence``), redacted secret types (``secrets``) and the one
retry policy (``retry``).

It imports nothing of ours and needs only pydantic, cryptography and
noiseprotocol (tests/test_layering.py holds it to that).
"""
