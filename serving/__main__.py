"""``python -m serving [--host H] [--port N]``: the serving API with uvicorn."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    from core.logs import configure_logging

    configure_logging()  # JSON lines; LOG_FORMAT=text for plain text
    import uvicorn

    from core.settings import Settings
    from serving.app import create_app

    uvicorn.run(create_app(Settings()), host=args.host, port=args.port, log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
