"""What a Slack answer means for a message the notifier relays: retry later, a fresh root, give
up the thread, pause the relay, or give up that one write. ``slack_problem`` sorts an error answer;
network errors (``OSError``, ``http.client.HTTPException``) are ``RetryLater``."""

from __future__ import annotations

from typing import Any

from slack_sdk.errors import SlackApiError

TRANSIENT = {
    "ratelimited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
}
ROOT_GONE = {"message_not_found", "thread_not_found"}
# The channel cannot take this job's messages any more; other channels are fine.
UNWRITABLE = {
    "channel_not_found",
    "is_archived",
    "channel_is_archived",
    "not_in_channel",
    "restricted_action",
    "restricted_action_read_only_channel",
    "team_access_not_granted",
}
# The token itself is refused: every channel fails alike until an operator fixes it.
TOKEN_REFUSED = {
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "not_allowed_token_type",
}


class Undelivered(Exception):
    """A Slack write that did not go through; the subclass says what to do about it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Undelivered):
    """Slack or the network cannot take it now: the event waits for a later round."""

    def __init__(self, reason: str, *, pause_s: float | None = None) -> None:
        super().__init__(reason)
        self.pause_s = pause_s


class RoundSpent(RetryLater):
    """The channel used its writes for this round (or the relay is paused)."""


class RootGone(Undelivered):
    """The job's root message was deleted: its thread needs a fresh root."""


class ThreadUnwritable(Undelivered):
    """The job's channel cannot be written: its thread is given up."""


class TokenRefused(Undelivered):
    """Slack refuses the bot's token: the whole relay pauses."""


class Rejected(Undelivered):
    """Slack will never accept this write (or its artifact is gone): that part is given up."""


def slack_problem(exc: SlackApiError) -> Undelivered:
    """Sort a Slack error answer into what the relay does about it."""
    response = exc.response
    data = response.data if isinstance(response.data, dict) else {}
    status = int(response.status_code or 0)
    code = str(data.get("error") or f"HTTP {status}")
    if status == 429 or code == "ratelimited":
        return RetryLater(f"rate limited ({code})", pause_s=_retry_after(response.headers))
    if status >= 500 or code in TRANSIENT:
        return RetryLater(code)
    if code in ROOT_GONE:
        return RootGone(code)
    if code in UNWRITABLE:
        return ThreadUnwritable(code)
    if code in TOKEN_REFUSED:
        return TokenRefused(code)
    messages = (data.get("response_metadata") or {}).get("messages") or []
    return Rejected(f"{code} ({messages[0]})" if messages else code)


def _retry_after(headers: Any) -> float:
    for key, value in dict(headers or {}).items():
        if key.lower() == "retry-after":
            value = value[0] if isinstance(value, list) else value
            try:
                return max(1.0, float(value))
            except ValueError:
                break
    return 1.0
