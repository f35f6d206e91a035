"""The package as a user installs it (`pip install .`, a wheel), not only as an editable checkout: it
must carry every module and the database migrations, which live in the top-level migrations/ folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_wheel_carries_every_module_and_the_migrations_and_can_migrate(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "audience_sync", source / "audience_sync", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "migrations", source / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    # setuptools' warnings (e.g. a license table instead of an SPDX string) show on stderr even with -q.
    assert "Warning" not in built.stderr and "deprecated" not in built.stderr, built.stderr[-3000:]
    [wheel] = tmp_path.glob("audience_sync-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "audience_sync").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "audience_sync/daemon/status.css" in modules
    migrations = {
        "audience_sync/_migrations/" + p.relative_to(ROOT / "migrations").as_posix()
        for p in (ROOT / "migrations").rglob("*")
        if p.is_file() and p.suffix in (".py", ".mako")
    }
    assert "audience_sync/_migrations/versions/0001_initial.py" in migrations
    assert modules - names == set(), "files missing from the wheel (add new subpackages and data to pyproject.toml)"
    assert migrations - names == set(), "migrations missing from the wheel"

    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "store.db"}"\n')
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import audience_sync.store.migrate as m; print(m.__file__); print(m.migrations_dir())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    module_file, migrations_dir = where.stdout.split()
    assert module_file.startswith(str(site)) and migrations_dir == str(site / "audience_sync" / "_migrations")
    upgraded = subprocess.run(
        [sys.executable, "-m", "audience_sync", "db", "upgrade", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    checked = subprocess.run(
        [sys.executable, "-m", "audience_sync", "audiences", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert checked.returncode == 0 and checked.stdout.strip() == "[]", checked.stderr[-3000:]
    page = subprocess.run(
        [sys.executable, "-c", "from audience_sync.daemon.web import CSS; print(len(CSS))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert page.returncode == 0 and int(page.stdout) > 1000, page.stderr[-3000:]  # the page's style sheet
