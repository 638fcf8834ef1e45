"""Hugging Face model ids, found in the local Hugging Face cache; nothing is ever downloaded.

vLLM users name models by their Hub id (`Qwen/Qwen2.5-7B-Instruct`). When such a model was
downloaded before (by transformers, huggingface-cli, vLLM itself), its snapshot directory is a
Hugging Face model directory like any other, so it is served from there. The cache is the one
huggingface_hub uses: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, read when asked
(not when huggingface_hub was imported, so a changed environment is honoured)."""
from __future__ import annotations

import os
from pathlib import Path

CONFIG = "config.json"


def hub_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_repo_id(name: str) -> bool:
    """`owner/name` as the Hub spells ids (a path such as ./model or /a/b/c is not one)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of model `repo_id` (its `main` revision when that is cached, else
    the newest), if it holds a config.json; None if the model is not in the cache."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    hit = try_to_load_from_cache(repo_id, CONFIG, cache_dir=str(cache))
    if isinstance(hit, str):
        return Path(hit).parent
    return _scan(repo_id, cache)  # another spelling of the id, or a revision other than main


def _scan(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    if not cache.is_dir():
        return None
    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, CorruptedCacheException):
        return None
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id.lower() != repo_id.lower():
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        for revision in revisions:
            if (revision.snapshot_path / CONFIG).is_file():
                return revision.snapshot_path
    return None
