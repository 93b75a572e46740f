"""frontend: the stateless public API. Authenticates the account holder,
routes each user to an island by rendezvous hashing, and passes the
island's signed answers through."""
