"""Identifiers and fixed sizes every hop agrees on, with their patterns.

Python's ``re`` ``$`` also matches before a final newline ("alice\\n" once
passed a check here and was refused by the island's pydantic regex), so the
compiled patterns are always used with ``fullmatch``.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

USER_ID_PATTERN = r"[A-Za-z0-9._@+\-]{1,128}"
USER_ID_RE = re.compile(USER_ID_PATTERN)
ISLAND_ID_PATTERN = r"[a-z0-9][a-z0-9\-]{0,62}"
ISLAND_ID_RE = re.compile(ISLAND_ID_PATTERN)

UserId = Annotated[str, StringConstraints(pattern=rf"^{USER_ID_PATTERN}$")]
IslandId = Annotated[str, StringConstraints(pattern=rf"^{ISLAND_ID_PATTERN}$")]
UserRef = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # bkv_protocol.encoding.user_ref
FleetId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]  # bkv_protocol.encoding.fleet_id_for
RequestIdHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]

EK_LEN = 32 + 16  # the client's AES-256-GCM of its 32-byte K
K_NONCE_LEN = 12
