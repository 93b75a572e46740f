"""The CLI's exit codes (docs/cli.md) and the one map from an outcome to its
code and line, apart from the commands so that every command -- those of
other packages (``bkv.commands``) too -- shares them."""

from __future__ import annotations

import contextlib
import enum
from typing import Iterator

import typer

from bkv import errors
from bkv.storage import errors as serr

DOCS_LOCKED_OUT = "docs/cli.md, \"When the escrowed key does not come back\""


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    WRONG_PASSWORD = 3
    LOCKED_OUT = 4
    VAULT_UNAVAILABLE = 5
    CORRUPT_BACKUP = 6
    NO_RECORD = 7
    UNAUTHORIZED = 8
    BAD_SIGNATURE = 9
    WRONG_KEY = 10
    STORE_ERROR = 11
    AUDIT_FAILED = 12
    KEY_NOT_RECOVERED = 13  # bkv backup stopped: the escrowed key did not come back, and no new one was made
    ESCROW_EXISTS = 14  # a live escrow is replaced only with its password (or after `bkv password forgot`)
    RATE_LIMITED = 15  # over a rate limit for longer than the deadline: nothing was done; try again later
    EVENTS_MISSING = 16  # bkv events --after N: the vault's signed feed proves changes after N it did not show
    TOO_EARLY = 17  # wrong guesses are spaced out: no recovery before the time printed (nothing was spent)


def fail(message: str, code: ExitCode) -> None:
    typer.echo(f"bkv: {message}", err=True)
    raise typer.Exit(int(code))


@contextlib.contextmanager
def outcomes() -> Iterator[None]:
    """Every expected failure becomes its documented exit code and one line.
    What the vault's answer says in free text is never printed where a forger
    could put instructions there (a refusal's message, a lock-out)."""
    E = ExitCode
    try:
        yield
    except errors.WrongPassword as exc:
        fail(str(exc), E.WRONG_PASSWORD)
    except errors.LockedOut:
        # Say what happened and where to read on; never what to run: the
        # answer may be forged, and "make a new key" is what a forger wants.
        fail("the vault answered that the escrowed key was destroyed (too many wrong passwords, or disabled): "
             f"backups protected by it can no longer be decrypted. See {DOCS_LOCKED_OUT} before doing "
             "anything else.", E.LOCKED_OUT)
    except errors.TooEarly as exc:
        # The time is the fleet's signed word (verified); the rest of the line is ours.
        fail(f"too many wrong passwords lately: the vault takes the next try after "
             f"{exc.retry_at:%Y-%m-%d %H:%M:%S} UTC. No attempt was spent; try again then.", E.TOO_EARLY)
    except errors.VaultUnavailable as exc:
        fail(str(exc), E.VAULT_UNAVAILABLE)
    except errors.RateLimited as exc:
        fail(f"too many requests for this account or device (rate limited); nothing was done. Try again in "
             f"{exc.retry_after:.0f}s", E.RATE_LIMITED)
    except errors.NoRecord:
        fail("no key is escrowed for this account: nothing to recover (was the backup made in key mode?)",
             E.NO_RECORD)
    except errors.Unauthorized as exc:
        fail(str(exc), E.UNAUTHORIZED)
    except errors.EscrowExists:
        fail("a key is escrowed for this account already, and the vault replaces it only with its password: "
             "use `bkv password change`, or `bkv backup --new-key` with the current password; with the "
             "password forgotten, `bkv password forgot` destroys the old key first. Nothing was changed.",
             E.ESCROW_EXISTS)
    except errors.BadSignature as exc:
        fail(str(exc), E.BAD_SIGNATURE)
    except errors.ProtocolError as exc:
        # The code only: the message is free text from whoever answered, and a
        # forger would write instructions there.
        fail(f"the vault refused the request ({exc.code}); see docs/api.md for the code", E.ERROR)
    except errors.VaultError as exc:
        fail(str(exc), E.ERROR)
    except serr.CorruptBackup as exc:
        fail(f"the backup is corrupt or was tampered with: {exc}. Nothing was restored.", E.CORRUPT_BACKUP)
    except (serr.WrongKey, serr.BadKeyDigits) as exc:
        fail(str(exc), E.WRONG_KEY)
    except (serr.StoreError, serr.NoBackup) as exc:
        fail(str(exc), E.STORE_ERROR)
    except (serr.DestinationNotEmpty, serr.UnsupportedEntry) as exc:
        fail(str(exc), E.USAGE)
