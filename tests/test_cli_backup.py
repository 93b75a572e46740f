"""`bkv backup` and `bkv restore` as a user runs them, through the real
local fleet, on a local store and on an S3 store (moto's server)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bkv.config import ClientConfig
from bkv.storage.format import HEADER_LEN
from bkv_protocol.noise import StaticKey
from bkv_dev.fleet import free_base_port
from conftest import unique_user
from support import procs

PW = "my chat backup password"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_base_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    # fsspec reads FSSPEC_* variables once, at import: tell this process directly too,
    # so nothing here ever tries a real S3 endpoint.
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {**saved_conf, "endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}
    fs, _ = fsspec.core.url_to_fs("s3://bkv-test")
    fs.mkdir("bkv-test")
    yield env
    fsspec.config.conf["s3"] = saved_conf
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def make_device(fleet, home: Path, user: str | None = None):
    """A machine with nothing but the client config for an account (a fresh
    one unless ``user`` is given): a ``bkv(*args)`` runner. Two devices of
    one account have their own Noise keys and tokens."""
    user = user or unique_user("cli")
    # Through Envoy and Noise, as a real device: its own key and a token bound to it.
    device_key = StaticKey.generate()
    token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device_key.public).decode())
    cfg = ClientConfig(url=fleet.frontend_url, fleet_public_key=fleet.fleet_params["fleet_public_key"],
                       user_id=user, token=token, edge_url=fleet.edge_url, edge_public_key=fleet.edge_public_key,
                       device_key=base64.b64encode(device_key.reveal()).decode())
    cfg.save(home / "bkv" / "config.toml")

    def bkv(*args, stdin: str | None = None, password: str | None = PW, tty_input: str | None = None):
        e = {**os.environ, "XDG_CONFIG_HOME": str(home)}  # read now: the S3 fixture may have added to it
        e.pop("BKV_PASSWORD", None)
        if password is not None:
            e["BKV_PASSWORD"] = password
        argv = [sys.executable, "-m", "bkv.cli", *args]
        if tty_input is None:
            return procs.run(argv, env=e, input=stdin, capture_output=True, text=True, timeout=120)
        # A user at a terminal: stdin is a pseudo-terminal, typed ahead of the prompt.
        master, slave = os.openpty()
        try:
            with procs.spawn(argv, env=e, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) as proc:
                os.close(slave)
                slave = -1
                os.write(master, tty_input.encode())
                out, err = proc.communicate(timeout=120)
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)
        finally:
            os.close(master)
            if slave != -1:
                os.close(slave)

    bkv.user, bkv.config, bkv.home = user, cfg, home
    return bkv


@pytest.fixture
def device(fleet, tmp_path):
    """A machine with nothing but the client config for a fresh account."""
    return make_device(fleet, tmp_path / "home")


def make_source(root: Path) -> Path:
    (root / "chats" / "a").mkdir(parents=True)
    (root / "chats" / "a" / "one.txt").write_bytes(os.urandom(50_000))
    (root / "chats" / "empty.txt").write_bytes(b"")
    (root / "chats" / "media").mkdir()
    (root / "chats" / "media" / "big.bin").write_bytes(os.urandom(3 << 20))
    return root / "chats"


def make_sqlite(root: Path) -> Path:
    import sqlite3

    db = root / "msgstore.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table messages (id integer primary key, body blob)")
        conn.executemany("insert into messages (body) values (?)", [(os.urandom(200),) for _ in range(3000)])
    return db


def make_large(root: Path) -> Path:
    big = root / "large.bin"
    with open(big, "wb") as f:
        for _ in range(40):
            f.write(os.urandom(1 << 20))
    return big


SOURCES = {"directory": make_source, "sqlite": make_sqlite, "large": make_large}


def tree(root: Path) -> list:
    return sorted((p.relative_to(root).as_posix(), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("source_kind", list(SOURCES))
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_backup_then_restore_on_a_new_device_is_byte_identical(device, tmp_path, kind, source_kind, request):
    store = str(tmp_path / "store") if kind == "local" else f"s3://bkv-test/{tmp_path.name}"
    if kind == "s3":
        request.getfixturevalue("s3_endpoint")
    src = SOURCES[source_kind](tmp_path)
    first = device("backup", str(src), "--store", store, "--json")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["new_key"] is True and "key" not in out
    second = device("backup", str(src), "--store", store, "--json")  # reuses K through the vault
    assert second.returncode == 0 and json.loads(second.stdout)["new_key"] is False
    listed = json.loads(device("list", "--store", store, "--json").stdout)
    assert [b["backup_id"] for b in listed][-1] == json.loads(second.stdout)["backup_id"] and len(listed) == 2
    assert device("verify", "--store", store).returncode == 0
    restored = device("restore", "--store", store, "--dest", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    if src.is_dir():
        assert tree(tmp_path / "restored") == tree(src)
    else:
        assert (tmp_path / "restored" / src.name).read_bytes() == src.read_bytes()
    assert PW not in first.stdout + first.stderr + restored.stdout + restored.stderr


def test_a_wrong_password_exits_3_and_says_how_many_attempts_are_left(device, tmp_path):
    src = make_source(tmp_path)
    assert device("backup", str(src), "--store", str(tmp_path / "s")).returncode == 0
    res = device("restore", "--store", str(tmp_path / "s"), "--dest", str(tmp_path / "d"), password="nope")
    assert res.returncode == 3 and "9 attempts left" in res.stderr
    assert not (tmp_path / "d").exists()


def test_a_lockout_exits_4_and_says_the_backup_cannot_be_decrypted(device, tmp_path):
    src = make_source(tmp_path)
    assert device("backup", str(src), "--store", str(tmp_path / "s")).returncode == 0
    for i in range(10):
        device("verify", "--store", str(tmp_path / "s"), password=f"wrong {i}")
    res = device("restore", "--store", str(tmp_path / "s"), "--dest", str(tmp_path / "d"))
    assert res.returncode == 4 and "can no longer be decrypted" in res.stderr
    # What happened and where to read on; never a command to run (a forged answer would use it).
    assert "docs/cli.md" in res.stderr and "--new-key" not in res.stderr


def _flip(d: bytes) -> bytes:
    b = bytearray(d)
    b[len(b) // 2] ^= 1
    return bytes(b)


def _swap_first_chunks(d: bytes) -> bytes:
    h, c = HEADER_LEN, (1 << 20) + 16
    return d[:h] + d[h + c:h + 2 * c] + d[h:h + c] + d[h + 2 * c:]


TAMPERING = {"bit flip": _flip, "truncation": lambda d: d[:-100], "appended bytes": lambda d: d + b"x",
             "reordered chunks": _swap_first_chunks, "dropped final chunk": lambda d: d[:HEADER_LEN + 2 * ((1 << 20) + 16)]}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_tampered_backup_exits_6_and_leaves_the_destination_untouched(device, tmp_path, how):
    src = make_source(tmp_path)  # 3 MiB: four chunks
    out = json.loads(device("backup", str(src), "--store", str(tmp_path / "s"), "--json").stdout)
    path = tmp_path / "s" / f"{out['backup_id']}.bkv"
    path.write_bytes(TAMPERING[how](path.read_bytes()))
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    res = device("restore", "--store", str(tmp_path / "s"), "--dest", str(dest), "--replace")
    assert res.returncode == 6 and "tampered" in res.stderr
    assert tree(dest) == [("keep", b"mine")]
    assert device("verify", "--store", str(tmp_path / "s")).returncode == 6


def test_key_mode_prints_the_key_once_and_restores_without_the_vault(device, tmp_path):
    src = make_source(tmp_path)
    res = device("backup", str(src), "--store", str(tmp_path / "s"), "--key-mode", password=None)
    assert res.returncode == 0, res.stderr
    digits = [line.strip() for line in res.stdout.splitlines() if line.strip().replace(" ", "").isdigit()][0]
    assert len(digits.replace(" ", "")) == 64
    typo = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    bad = device("restore", "--store", str(tmp_path / "s"), "--dest", str(tmp_path / "d"), "--key", typo,
                 password=None)
    assert bad.returncode == 10 and "typo" in bad.stderr
    ok = device("restore", "--store", str(tmp_path / "s"), "--dest", str(tmp_path / "d"), "--key", digits,
                password=None)
    assert ok.returncode == 0, ok.stderr
    assert tree(tmp_path / "d") == tree(src)


def test_password_change_keeps_old_backups_readable_with_the_new_password(device, tmp_path):
    src = make_source(tmp_path)
    assert device("backup", str(src), "--store", str(tmp_path / "s")).returncode == 0
    res = device("password", "change", "--password-stdin", stdin=f"{PW}\nnew password\n", password=None)
    assert res.returncode == 0, res.stderr
    assert device("verify", "--store", str(tmp_path / "s"), password="new password").returncode == 0
    assert device("verify", "--store", str(tmp_path / "s")).returncode == 3


def test_disable_destroys_the_key_and_optionally_the_backups(device, tmp_path):
    src = make_source(tmp_path)
    assert device("backup", str(src), "--store", str(tmp_path / "s")).returncode == 0
    res = device("disable", "--yes", "--store", str(tmp_path / "s"), "--delete-backups")
    assert res.returncode == 0 and "1 backups deleted" in res.stdout
    assert json.loads(device("list", "--store", str(tmp_path / "s"), "--json").stdout) == []
    # The key is gone for good, and this device escrowed one: no new key without --new-key, confirmed.
    res = device("backup", str(src), "--store", str(tmp_path / "s2"))
    assert res.returncode == 13 and "destroyed" in res.stderr, res.stderr
    assert json.loads(device("list", "--store", str(tmp_path / "s2"), "--json").stdout) == []


def test_a_backup_never_makes_a_new_key_when_the_store_holds_vault_mode_backups(fleet, device, tmp_path):
    src = make_source(tmp_path)
    store = str(tmp_path / "s")
    assert device("backup", str(src), "--store", store).returncode == 0
    # Another account, on a device that never escrowed, whose vault truly holds nothing:
    # the store's vault-mode backup is enough to refuse making a key.
    other = make_device(fleet, tmp_path / "other-home")
    res = other("backup", str(src), "--store", store, "--password-stdin", stdin=PW + "\n", password=None)
    assert res.returncode == 13, res.stderr
    assert "could not be recovered" in res.stderr and "undecryptable" in res.stderr
    assert "this store holds 1 backup made with an escrowed key" in res.stderr
    assert "docs/cli.md" in res.stderr and "--new-key" not in res.stderr
    assert len(json.loads(device("list", "--store", store, "--json").stdout)) == 1
    # Nothing was escrowed for it: its first backup into an empty store makes the key, as always.
    first = other("backup", str(src), "--store", str(tmp_path / "s2"), "--json")
    assert first.returncode == 0 and json.loads(first.stdout)["new_key"] is True, first.stderr


def test_a_backup_counts_a_backup_with_a_damaged_header_as_one_that_needs_the_escrowed_key(device, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / f"{'ab' * 16}.bkv").write_bytes(b"not a header" * 10)
    res = device("backup", str(make_source(tmp_path)), "--store", str(tmp_path / "s"))
    assert res.returncode == 13 and "or with a damaged header" in res.stderr, res.stderr


def test_a_backup_never_makes_a_new_key_when_this_device_escrowed_before(fleet, tmp_path):
    from bkv.config import EscrowMarks

    src = make_source(tmp_path)
    fresh = make_device(fleet, tmp_path / "home")
    # This device escrowed for the account before (the mark a backup leaves); the vault says no_record.
    EscrowMarks(fresh.home / "bkv" / "escrowed.json").mark(fresh.config)
    res = fresh("backup", str(src), "--store", str(tmp_path / "s"))
    assert res.returncode == 13, res.stderr
    assert "has no key for this account" in res.stderr and "this device escrowed or recovered a key" in res.stderr
    assert json.loads(fresh("list", "--store", str(tmp_path / "s"), "--json").stdout) == []


def test_a_backup_leaves_the_escrow_mark_only_for_its_own_account_and_vault(fleet, device, tmp_path):
    from bkv.config import EscrowMarks

    src = make_source(tmp_path)
    assert device("backup", str(src), "--store", str(tmp_path / "s")).returncode == 0
    marks = EscrowMarks(device.home / "bkv" / "escrowed.json")
    assert marks.has(device.config)
    assert not marks.has(dataclasses.replace(device.config, user_id=device.user + "-other"))
    assert (marks.path.stat().st_mode & 0o777) == 0o600


def test_new_key_needs_an_explicit_confirmation_and_then_abandons_the_old_backups(device, tmp_path):
    src = make_source(tmp_path)
    store = str(tmp_path / "s")
    old = json.loads(device("backup", str(src), "--store", store, "--json").stdout)
    refused = device("backup", str(src), "--store", store, "--new-key")  # a script: stdin is no terminal
    assert refused.returncode == 2 and "--yes-abandon-old-backups" in refused.stderr
    alone = device("backup", str(src), "--store", store, "--yes-abandon-old-backups")
    assert alone.returncode == 2 and "only confirms --new-key" in alone.stderr
    assert len(json.loads(device("list", "--store", store, "--json").stdout)) == 1
    res = device("backup", str(src), "--store", store, "--new-key", "--yes-abandon-old-backups", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["new_key"] is True, res.stderr
    # Really abandoned: the old backup no longer decrypts; the new one does.
    lost = device("verify", "--store", store, "--backup", old["backup_id"])
    assert lost.returncode == 10, lost.stderr
    assert device("verify", "--store", store).returncode == 0


def test_new_key_at_a_terminal_asks_for_the_typed_phrase(device, tmp_path):
    src = make_source(tmp_path)
    store = str(tmp_path / "s")
    assert device("backup", str(src), "--store", store).returncode == 0
    wrong = device("backup", str(src), "--store", store, "--new-key", tty_input="yes\n")
    assert wrong.returncode == 2 and "not confirmed" in wrong.stderr, wrong.stderr
    assert device("verify", "--store", store).returncode == 0  # the key did not change
    typed = device("backup", str(src), "--store", store, "--new-key", "--json", tty_input="abandon old backups\n")
    assert typed.returncode == 0 and json.loads(typed.stdout)["new_key"] is True, typed.stderr
    assert len(json.loads(device("list", "--store", store, "--json").stdout)) == 2
