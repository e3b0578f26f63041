"""Schema migrations, run programmatically at startup (no alembic.ini needed).

For developers, a new revision is made with:

    python -c "from corral.server.store._migrate import revision; revision('add x')"

which autogenerates against `sqlite:///./corral-dev.db` after upgrading it to head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

__all__ = ["MIGRATIONS_DIR", "current_revision", "head_revision", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def migrate(engine: Engine) -> None:
    """Bring the database behind `engine` to the newest schema; a no-op when it is already there."""
    config = _config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def revision(message: str, url: str = "sqlite:///./corral-dev.db") -> None:  # pragma: no cover - dev tool
    from corral.server.store._engine import create_engine

    engine = create_engine(url)
    migrate(engine)
    command.revision(_config(engine), message=message, autogenerate=True)
