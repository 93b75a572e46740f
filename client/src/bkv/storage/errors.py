"""Exceptions of backup storage, drawn as a tree (the CLI maps them to exit codes).

::

    BackupError
    ├── CorruptBackup          a byte was changed, dropped, added or moved: nothing was restored
    │   └── TruncatedBackup    the backup ends before its final chunk
    ├── WrongKey               the key does not belong to this backup (checked before any decryption)
    ├── BadKeyDigits           a 64-digit key with a typo: the checksum caught it
    ├── NoBackup               nothing (or no such backup id) in the store
    ├── StoreError             the store could not be read or written
    ├── DestinationNotEmpty    restore refuses to mix into a non-empty DEST (use replace)
    └── UnsupportedEntry       the source holds something we do not back up (symlinks, devices)
"""


class BackupError(Exception):
    pass


class CorruptBackup(BackupError):
    pass


class TruncatedBackup(CorruptBackup):
    pass


class WrongKey(BackupError):
    pass


class BadKeyDigits(BackupError):
    pass


class NoBackup(BackupError):
    pass


class StoreError(BackupError):
    pass


class DestinationNotEmpty(BackupError):
    pass


class UnsupportedEntry(BackupError):
    pass
