"""`bkv backup` and `bkv restore` as a user runs them, through the real
local fleet, on a local store and on an S3 store (moto's server)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bkv.config import ClientConfig
from bkv.storage.format import HEADER_LEN
from bkv_edge.noise import StaticKey
from conftest import _free_base_port, unique_user

PW = "my chat backup password"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_base_port()
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


@pytest.fixture
def device(fleet, tmp_path):
    """A machine with nothing but the client config for a fresh account."""
    user = unique_user("cli")
    home = tmp_path / "home"
    # Through Envoy and Noise, as a real device: its own key and a token bound to it.
    device_key = StaticKey.generate()
    token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device_key.public).decode())
    cfg = ClientConfig(url=fleet.frontend_url, fleet_public_key=fleet.fleet_params["fleet_public_key"],
                       user_id=user, token=token, edge_url=fleet.edge_url, edge_public_key=fleet.edge_public_key,
                       device_key=base64.b64encode(device_key.reveal()).decode())
    cfg.save(home / "bkv" / "config.toml")
    def bkv(*args, stdin: str | None = None, password: str | None = PW):
        e = {**os.environ, "XDG_CONFIG_HOME": str(home)}  # read now: the S3 fixture may have added to it
        e.pop("BKV_PASSWORD", None)
        if password is not None:
            e["BKV_PASSWORD"] = password
        return subprocess.run([sys.executable, "-m", "bkv.cli", *args], env=e, input=stdin, capture_output=True,
                              text=True, timeout=120)

    return bkv


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
    assert device("backup", str(src), "--store", str(tmp_path / "s2")).returncode == 4  # the key is gone for good
