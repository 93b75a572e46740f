"""Key mode: 64 digits with a checksum that catches typos before decryption."""

from __future__ import annotations

import math
import os

import pytest

from bkv.storage import create_backup, restore_backup
from bkv.storage import format as fmt
from bkv.storage.errors import BadKeyDigits, WrongKey
from bkv.storage.keymode import SECRET_DIGITS, KeyDigits


def test_the_key_is_64_digits_with_at_least_192_bits_of_secret():
    d = KeyDigits.generate()
    assert len(d.reveal()) == 64 and d.reveal().isdigit()
    assert SECRET_DIGITS * math.log2(10) >= 192
    assert KeyDigits.parse(d.grouped()).backup_key() == d.backup_key()
    assert repr(d) == "KeyDigits(redacted)" and d.reveal().decode() not in repr(d)


def test_every_single_wrong_digit_and_every_neighbour_swap_is_caught():
    d = KeyDigits.generate().reveal().decode()
    for i in range(64):
        for wrong in "0123456789":
            if wrong != d[i]:
                with pytest.raises(BadKeyDigits):
                    KeyDigits.parse(d[:i] + wrong + d[i + 1:])
        if i < 63 and d[i] != d[i + 1]:
            with pytest.raises(BadKeyDigits):
                KeyDigits.parse(d[:i] + d[i + 1] + d[i] + d[i + 2:])


def test_spaces_and_dashes_are_ignored_but_a_short_key_is_refused():
    d = KeyDigits.generate()
    assert KeyDigits.parse("-".join(d.grouped().split())).reveal() == d.reveal()
    with pytest.raises(BadKeyDigits):
        KeyDigits.parse(d.reveal().decode()[:63])


def test_a_key_mode_backup_round_trips_and_another_key_is_refused(tmp_path):
    (tmp_path / "f.txt").write_bytes(os.urandom(10_000))
    d = KeyDigits.generate()
    create_backup(tmp_path / "f.txt", str(tmp_path / "store"), d.backup_key(), key_mode=fmt.KEY_MODE_DIGITS)
    restore_backup(str(tmp_path / "store"), tmp_path / "out", KeyDigits.parse(d.grouped()).backup_key())
    assert (tmp_path / "out" / "f.txt").read_bytes() == (tmp_path / "f.txt").read_bytes()
    with pytest.raises(WrongKey):
        restore_backup(str(tmp_path / "store"), tmp_path / "out2", KeyDigits.generate().backup_key())
