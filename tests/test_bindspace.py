"""Bindspaces: private, exclusive, short enough, removed without following links."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.bindspace import (
    bindspace_contents,
    bindspace_env,
    bindspace_root,
    check_path_room,
    create_bindspace,
    list_bindspaces,
    max_socket_name,
    remove_bindspace,
    socket_dir,
    unix_path_limit,
)
from harness.errors import HarnessError

NOBODY = 65534


def test_create_is_private_and_has_a_socket_folder(runtime_dir: Path) -> None:
    root = bindspace_root(runtime_dir)
    path = create_bindspace("s-0000aaaa", root=root)
    assert path == runtime_dir / "tractor" / "s-0000aaaa"
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(os.lstat(socket_dir(path)).st_mode) == 0o700


def test_create_is_exclusive(runtime_dir: Path) -> None:
    root = bindspace_root(runtime_dir)
    create_bindspace("s-0000aaaa", root=root)
    with pytest.raises(FileExistsError):
        create_bindspace("s-0000aaaa", root=root)


def test_create_is_private_under_a_wide_umask(runtime_dir: Path) -> None:
    old = os.umask(0)
    try:
        path = create_bindspace("s-0000aaaa", root=bindspace_root(runtime_dir))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


def test_symlinked_root_is_refused(runtime_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (runtime_dir / "tractor").symlink_to(elsewhere)
    with pytest.raises(HarnessError, match="symlink"):
        bindspace_root(runtime_dir)
    assert list(elsewhere.iterdir()) == []


def test_foreign_root_is_refused(runtime_dir: Path) -> None:
    foreign = runtime_dir / "tractor"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(HarnessError, match=f"belongs to uid {NOBODY}") as info:
        bindspace_root(runtime_dir)
    assert "HARNESS_RUNTIME_DIR" in str(info.value)


def test_bad_folder_name_is_refused(runtime_dir: Path) -> None:
    with pytest.raises(HarnessError, match="one plain folder name"):
        bindspace_root(runtime_dir, "a/b")


def test_max_socket_name_is_the_real_limit(runtime_dir: Path) -> None:
    """A name of exactly max_socket_name bytes binds; one byte more does not."""
    folder = create_bindspace("s-0000aaaa", root=bindspace_root(runtime_dir))
    room = max_socket_name(folder)
    assert room == unix_path_limit() - len(str(folder)) - 1
    fits = folder / ("a" * room)
    too_long = folder / ("b" * (room + 1))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(fits))
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        pytest.raises(OSError, match="too long"),
    ):
        sock.bind(str(too_long))


def test_too_deep_root_is_refused_with_the_numbers() -> None:
    deep = Path(tempfile.mkdtemp(prefix="d" * 60, dir="/tmp"))
    try:
        root = bindspace_root(deep)
        with pytest.raises(HarnessError) as info:
            create_bindspace("name-0000aaaa", root=root)
        text = str(info.value)
        assert str(unix_path_limit()) in text
        assert "40 bytes reserved" in text
        assert "HARNESS_RUNTIME_DIR" in text
        assert list_bindspaces(root) == []
    finally:
        remove_bindspace(deep)


def test_reserve_is_configurable(runtime_dir: Path) -> None:
    path = bindspace_root(runtime_dir) / "s-0000aaaa"
    check_path_room(path, reserve=40)
    with pytest.raises(HarnessError, match="reserved"):
        check_path_room(path, reserve=200)


def test_remove_keeps_link_targets_and_foreign_files(
    runtime_dir: Path, tmp_path: Path
) -> None:
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    outside_file = outside_dir / "precious"
    outside_file.write_text("keep me")
    path = create_bindspace("s-0000aaaa", root=bindspace_root(runtime_dir))
    (path / "tractor" / "deep").mkdir()
    (path / "tractor" / "deep" / "f").write_text("x")
    (path / "link-to-dir").symlink_to(outside_dir)
    (path / "tractor" / "link-to-file").symlink_to(outside_file)
    foreign = path / "tractor" / "foreign"
    foreign.write_text("not ours")
    os.chown(foreign, NOBODY, NOBODY)

    kept = remove_bindspace(path)

    assert kept == [foreign]
    assert outside_file.read_text() == "keep me"
    assert sorted(p.name for p in path.rglob("*")) == ["foreign", "tractor"]
    os.unlink(foreign)
    assert remove_bindspace(path) == []
    assert not path.exists()


def test_remove_refuses_a_symlinked_bindspace(
    runtime_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x")
    root = bindspace_root(runtime_dir)
    (root / "s-0000aaaa").symlink_to(target)
    with pytest.raises(HarnessError, match="not a folder"):
        remove_bindspace(root / "s-0000aaaa")
    assert (target / "f").exists()


def test_remove_of_a_missing_bindspace_is_fine(runtime_dir: Path) -> None:
    assert remove_bindspace(runtime_dir / "tractor" / "gone-0000aaaa") == []


def test_contents_ignore_empty_folders(runtime_dir: Path) -> None:
    path = create_bindspace("s-0000aaaa", root=bindspace_root(runtime_dir))
    assert bindspace_contents(path) == []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(socket_dir(path) / "a@1.sock"))
    assert bindspace_contents(path) == [socket_dir(path) / "a@1.sock"]


def test_list_skips_links_and_files(runtime_dir: Path) -> None:
    root = bindspace_root(runtime_dir)
    real = create_bindspace("s-0000aaaa", root=root)
    (root / "s-0000bbbb").symlink_to(real)
    (root / "loose.sock").write_text("")
    assert list_bindspaces(root) == [real]


def test_platformdirs_child_binds_inside_the_bindspace(
    runtime_dir: Path, python: str
) -> None:
    """The real platformdirs, in a child, resolves tractor's folder to ours."""
    pytest.importorskip("platformdirs")
    path = create_bindspace("s-0000aaaa", root=bindspace_root(runtime_dir))
    env = {**os.environ, **bindspace_env(path, runtime_dir)}
    script = (
        "import json, os, socket, platformdirs\n"
        "d = platformdirs.user_runtime_dir('tractor')\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(os.path.join(d, f'actor@{os.getpid()}.sock'))\n"
        "print(json.dumps([d, os.environ['HARNESS_RUNTIME_DIR']]))\n"
    )
    out = subprocess.run(
        [python, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    folder, harness_rt = json.loads(out)
    assert folder == str(socket_dir(path))
    assert harness_rt == str(runtime_dir)
    assert [p.parent for p in bindspace_contents(path)] == [socket_dir(path)]
