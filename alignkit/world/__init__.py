"""The tiny-world testbed: synthetic knowledge, safety prompts and a tiny pretrained model.

``ensure_tiny(seed)`` returns a cached world directory (built on first use);
``resolve_world_uri("world:tiny?seed=3")`` returns its model directory.
"""

from __future__ import annotations

from alignkit.world.cache import build_command, ensure_tiny, resolve_world_uri, world_dir_for_uri
from alignkit.world.generate import WORLD_VERSION, World, build_world, load_world

__all__ = [
    "WORLD_VERSION", "World", "build_command", "build_world", "ensure_tiny", "load_world",
    "resolve_world_uri", "world_dir_for_uri",
]
