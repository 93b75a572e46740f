"""Code shared by the client SDK and every service: wire encoding, the
domain-separation labels, the canonical transcript that the fleet signs,
redacted secret types and the one async retry helper."""
