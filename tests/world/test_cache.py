from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from alignkit.world import build_command, cache, ensure_tiny, resolve_world_uri, world_dir_for_uri


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """Replace the expensive build with a fake that records calls."""
    calls: list[tuple[int, dict]] = []

    def fake(world_dir: Path, seed: int, settings: dict) -> None:
        calls.append((seed, settings))
        time.sleep(0.2)  # long enough for a concurrent caller to hit the lock
        (world_dir / "model").mkdir()
        (world_dir / "base_report.json").write_text("{}")

    monkeypatch.setattr(cache, "_run_build", fake)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return calls


def test_ensure_tiny_builds_once_under_concurrency(fake_build, tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny(seed=5))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_build) == 1 and len(set(results)) == 1
    world_dir = results[0]
    assert world_dir.parent == tmp_path / "cache" / "world" and cache.is_complete(world_dir)
    assert not [p for p in world_dir.parent.iterdir() if ".tmp-" in p.name]  # temp dir renamed away
    assert ensure_tiny(seed=5) == world_dir and len(fake_build) == 1
    assert world_dir_for_uri("world:tiny?seed=5") == world_dir
    assert resolve_world_uri("world:tiny?seed=5") == world_dir / "model"
    assert ensure_tiny(seed=5, entities=50) != world_dir and len(fake_build) == 2


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
    def boom(world_dir, seed, settings):
        (world_dir / "partial.txt").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(cache, "_run_build", boom)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError):
        ensure_tiny(seed=1)
    assert [p.name for p in (tmp_path / "cache" / "world").iterdir() if not p.name.endswith(".lock")] == []


def test_build_command_out_dir(fake_build, tmp_path):
    out = build_command(seed=2, out=str(tmp_path / "mine"))
    assert out == (tmp_path / "mine").resolve() and cache.is_complete(out)
    with pytest.raises(FileExistsError):
        build_command(seed=2, out=str(tmp_path / "mine"))
