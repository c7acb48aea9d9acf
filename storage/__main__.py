"""``python -m storage migrate|current|downgrade REV`` against DATABASE_URL."""

from __future__ import annotations

import argparse
import logging
import sys

from core.settings import Settings
from storage import migrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="upgrade the database to the newest schema")
    sub.add_parser("current", help="print the schema revision of the database")
    down = sub.add_parser("downgrade", help="downgrade to a revision (e.g. -1 or base)")
    down.add_argument("revision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

    url = Settings().db_url
    if args.command == "migrate":
        migrate.upgrade(url)
    elif args.command == "current":
        migrate.current(url)
    else:
        migrate.downgrade(url, args.revision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
