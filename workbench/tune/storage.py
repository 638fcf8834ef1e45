"""Optuna storage URLs, opened with one-line errors: the missing database driver names the extra that
installs it, a bad URL or an unreachable database says so without SQLAlchemy's traceback. Used by
`tune` (which may create the storage) and by the report (which only reads an existing one)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

POSTGRES_EXTRA = 'pip install -e ".[postgres]"'


class StorageError(Exception):
    """A storage URL that cannot be used; the message is one line."""


def resolve_url(url: str) -> str:
    """`postgresql://` means the psycopg (3) driver to SQLAlchemy 2; the [postgres] extra installs
    psycopg2, so a URL without a driver uses that one when it is the one installed."""
    if url.startswith("postgresql://") and not _have("psycopg") and _have("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: blocked
        return False


def explain(url: str, exc: BaseException) -> StorageError:
    """One line for an exception raised while opening or reading `url`."""
    if isinstance(exc, ImportError) or isinstance(exc.__cause__, ImportError):
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None) or "its driver"
        if url.startswith("postgresql"):
            return StorageError(f"storage {url}: the PostgreSQL driver ({missing}) is not installed: "
                                f"{POSTGRES_EXTRA}")
        return StorageError(f"storage {url}: the database driver ({missing}) is not installed")
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text = first[0] if first else type(exc).__name__
    if type(exc).__name__ == "ArgumentError":
        text = "not a storage URL; give sqlite:///FILE.db, postgresql+psycopg2://USER@HOST/DB or journal:FILE"
    return StorageError(f"storage {url}: {text}")


def check_readable(url: str) -> None:
    """For a reader: the storage must exist (SQLite would create an empty file, a journal an empty log)
    and answer; raise StorageError otherwise."""
    import optuna

    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            path = Path(url.removeprefix(prefix))
            if not path.is_file():
                raise StorageError(f"storage {url}: no such file {path}")
    try:
        optuna.get_all_study_summaries(open_storage(url))
    except StorageError:
        raise
    except Exception as exc:  # SQLAlchemy's and the drivers' errors, whatever their class
        raise explain(url, exc) from None


def open_storage(url: str):
    """An Optuna storage object for `url` (journal:FILE or any SQLAlchemy URL); StorageError if it
    cannot be opened. Heartbeats mark the trials of a killed worker failed."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    import warnings

    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental, and are what we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(resolve_url(url), heartbeat_interval=10, grace_period=60)
    except Exception as exc:
        import sqlalchemy.exc

        if isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
            raise  # the table-creation race: the caller retries
        raise explain(url, exc) from None
