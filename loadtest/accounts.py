"""The seeded accounts, shared by the benchmark and the locustfile (kept
apart so importing it does not import Locust, which monkey-patches gevent)."""


def account(i: int, prefix: str = "load") -> tuple[str, str]:
    return f"{prefix}-{i}", f"pw-{prefix}-{i}"
