"""The bot's calls to the serving API (the bot never loads a model)."""

from __future__ import annotations

from typing import Any

import httpx

from core.errors import FinetuneError
from core.settings import Settings


class ServingError(FinetuneError):
    code = "serving"


def call_serving(
    settings: Settings,
    method: str,
    path: str,
    json: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    headers = {}
    if settings.serving_api_key is not None:
        headers["Authorization"] = f"Bearer {settings.serving_api_key.get_secret_value()}"
    try:
        response = httpx.request(
            method,
            settings.serving_url.rstrip("/") + path,
            json=json,
            headers=headers,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise ServingError(
            f"the serving API at {settings.serving_url} is unreachable ({type(exc).__name__})"
        ) from exc
    if response.status_code >= 400:
        try:
            detail = response.json()
            message = (
                detail.get("error", {}).get("message")
                if "error" in detail
                else detail.get("detail")
            )
        except ValueError:
            message = response.text[:200]
        raise ServingError(f"serving refused: {message}")
    return response.json()  # type: ignore[no-any-return]
