"""Every domain-separation label in the protocol, in one place.

Each MAC, KDF, AEAD associated-data prefix and signature transcript has its
own label, so no value computed for one purpose is ever valid for another.
Changing a label is a protocol break: bump the ``v1``.
"""

from typing import Final

# Client-side KDFs (HKDF-SHA256 info strings).
OPAQUE_K_INFO: Final = b"bkv/v1/kdf/opaque-k"          # export key -> OPAQUE_K
RECOVERY_WRAP_INFO: Final = b"bkv/v1/kdf/recovery-wrap"  # SHARED_K -> key wrapping EK||K_NONCE
TICKET_KEY_INFO: Final = b"bkv/v1/kdf/ticket-key"      # SHARED_K -> the key a change ticket is proven with

# AES-GCM associated data prefixes.
EK_AAD: Final = b"bkv/v1/aead/ek"                    # EK = AEAD(K) under OPAQUE_K
RECOVERY_WRAP_AAD: Final = b"bkv/v1/aead/recovery-wrap"
RECORD_AAD: Final = b"bkv/v1/aead/record"            # sealed vault record
OPAQUE_SETUP_AAD: Final = b"bkv/v1/aead/opaque-setup"  # sealed OPAQUE server setup
CHALLENGE_AAD: Final = b"bkv/v1/aead/registration-challenge"
LOGIN_STATE_AAD: Final = b"bkv/v1/aead/login-state"
TICKET_AAD: Final = b"bkv/v1/aead/change-ticket"     # proof of the password, sealed at a successful login finish
REPLY_AAD: Final = b"bkv/v1/aead/reply"              # a committed answer kept for resends

# Fleet signature transcripts (ECDSA P-256 over SHA-256 of the transcript).
SIG_REGISTRATION_START: Final = b"bkv/v1/sig/registration-start"
SIG_REGISTRATION_FINISH: Final = b"bkv/v1/sig/registration-finish"
SIG_LOGIN_START: Final = b"bkv/v1/sig/login-start"
SIG_LOGIN_FINISH: Final = b"bkv/v1/sig/login-finish"
SIG_REFUSAL: Final = b"bkv/v1/sig/refusal"            # no_record / record_destroyed, bound to the request
SIG_DELETE: Final = b"bkv/v1/sig/delete"              # the escrow was deleted, bound to the request
SIG_EVENTS: Final = b"bkv/v1/sig/events"              # an account's event feed: user, version, chain head, nonce
# no_record / record_destroyed / too_early, bound to a record's state (user, island, version), not to a
# request: signed once per state and served again (transcripts.state_answer).
SIG_STATE: Final = b"bkv/v1/sig/record-state"

# MACs.
TICKET_PROOF_MAC: Final = b"bkv/v1/mac/ticket-proof"  # a device proves it holds a change ticket's key

# Hashes.
USER_KEY_HASH: Final = b"bkv/v1/hash/user-key"        # etcd key for a user's record
RENDEZVOUS_HASH: Final = b"bkv/v1/hash/rendezvous"    # user -> island placement
FLEET_ID_HASH: Final = b"bkv/v1/hash/fleet-id"        # fleet id from its public key
REQUEST_HASH: Final = b"bkv/v1/hash/request"          # request digests inside transcripts
REQUEST_FINGERPRINT: Final = b"bkv/v1/hash/request-fingerprint"  # a whole state-changing request
# OPAQUE's credential identifier of a registration: the user and a salt the
# HSM picks for each registration, so that no registration start ever
# evaluates a password under a live record's OPRF key (records of the
# build before it use the bare user id, which no new registration uses).
CREDENTIAL_ID: Final = b"bkv/v1/opaque/credential-id"
TRIE_LEAF: Final = b"bkv/v1/hash/trie-leaf"          # a record in an island's sparse Merkle trie (merkle.py)
TRIE_NODE: Final = b"bkv/v1/hash/trie-node"
LOG_RECORD: Final = b"bkv/v1/hash/log-record"        # a record's etcd entry as a trie leaf value
EVENT_CHAIN: Final = b"bkv/v1/hash/event-chain"      # an account's events, chained by the boundary (transcripts.event_chain)

# The HSM-held log (bkv_hsm_proxy/log.py): keys derived inside the boundary, MACs and the held answers.
LOG_KEY_INFO: Final = b"bkv/v1/kdf/log-key"          # OPAQUE server setup -> the log key
HELD_ANSWER_INFO: Final = b"bkv/v1/kdf/held-answer"  # log key -> the key answers are held under
LOG_ENTRY_MAC: Final = b"bkv/v1/mac/log-entry"
LOG_CAPTURE_MAC: Final = b"bkv/v1/mac/log-capture"   # an hsm-proxy's statement that it captured an entry
LOG_FREEZE_MAC: Final = b"bkv/v1/mac/log-freeze"     # an hsm-proxy's statement that it froze (a member-set change)
HELD_ANSWER_AAD: Final = b"bkv/v1/aead/held-answer"

# Validation bundles (docs/ota.md): the operator signs, the witness countersigns.
BUNDLE_BODY: Final = b"bkv/v1/bundle"                      # the canonical body (format 2 adds expires_at)
BUNDLE_HASH: Final = b"bkv/v1/hash/bundle"                 # a bundle's id and chain link
SIG_BUNDLE_OPERATOR: Final = b"bkv/v1/sig/bundle-operator"
SIG_BUNDLE_WITNESS: Final = b"bkv/v1/sig/bundle-witness"
# Deployment evidence (docs/ota.md): the fleet key attests, the operator signs.
SIG_EVIDENCE_FLEET: Final = b"bkv/v1/sig/evidence-fleet"
SIG_EVIDENCE_OPERATOR: Final = b"bkv/v1/sig/evidence-operator"
# The fleet's hsm-proxies (bkv_protocol.members): the offline admin key signs the set.
SIG_MEMBER_SET: Final = b"bkv/v1/sig/member-set"
SIG_MEMBER_FREEZE: Final = b"bkv/v1/sig/member-freeze"  # the admin's order to freeze a set (a change begins)
MEMBER_SET_HASH: Final = b"bkv/v1/hash/member-set"       # a state file names its set by this digest
# Which island holds a user (bkv_protocol.islands): the offline admin key signs the island set.
SIG_ISLAND_SET: Final = b"bkv/v1/sig/island-set"
ISLAND_SET_HASH: Final = b"bkv/v1/hash/island-set"      # names a set (its digest), e.g. in logs and answers
