"""Schema migrations from code: `upgrade_to_head(url)`; idempotent (a current schema is kept)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

from alembic import command

# alembic.ini and alembic/ live at the repository root, next to the service package.
REPO_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = REPO_ROOT / "alembic.ini"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    # Passed as an attribute, not a main option: ConfigParser would try to interpolate any
    # '%' in a URL-encoded password.
    cfg.attributes["url"] = url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade_to_head(url: str | None = None) -> None:
    """Bring the database at `url` (default: the configured one) to the newest revision."""
    if url is not None and url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
