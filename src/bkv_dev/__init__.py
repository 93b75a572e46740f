"""Dev tooling: the local fleet (``bkv dev``), the dev token issuer, the
chart's in-cluster test. Depends on the client and the services; nothing
depends on it but tests, the load test and the ``bkv.commands`` entry point."""
