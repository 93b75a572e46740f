"""Helpers the tests import (``from support.forging_proxy import ...``): tests/ is on sys.path as for conftest."""
