"""hsm-proxy: the HSM boundary. Runs the OPAQUE server, seals and unseals
vault records, issues registration challenges and login states, and signs
every response a client acts on. Stateless apart from its PKCS#11 token."""
