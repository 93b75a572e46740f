"""In-memory fakes of the production seams, for unit tests of logic only
(``from fakes import ...``: tests/ is on sys.path as for conftest). Tests that
claim the vault works use the real parts: a local fleet."""

from fakes.clock import FakeClock
from fakes.etcd import InMemoryEtcdFake
from fakes.hsm import InMemoryHsmFake, with_island_set
from fakes.hsm_port import InProcessHsmFake

__all__ = ["FakeClock", "InMemoryEtcdFake", "InMemoryHsmFake", "InProcessHsmFake", "with_island_set"]
