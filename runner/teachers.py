"""Which teachers a distillation may send a channel's data to, and the key each one gets.

Sending a channel's dataset to a URL typed in Slack would be data exfiltration if any URL went:
our own serving (``SERVING_URL``, inside the deployment) is always allowed, and
``DISTILL_TEACHERS`` lists the other API base URLs allowed (empty: none); a URL under one of them,
on the same scheme, host and port, is allowed. The bot checks a
``/finetune distill`` against it before queueing, and the runner again before any sample leaves,
so a job row written by other means (or a bot with other settings) sends nothing elsewhere.

The key is never typed in Slack: our serving gets ``SERVING_API_KEY``, every other allowed
teacher ``DISTILL_API_KEY`` (list only teachers that may see that key).

>>> from core.settings import Settings
>>> settings = Settings(_env_file=None, distill_teachers=["https://api.example.com/v1"])
>>> check_teacher("https://api.example.com/v1/", settings)
'https://api.example.com/v1'
>>> check_teacher("https://api.example.com.evil.net/v1", settings)
Traceback (most recent call last):
...
core.errors.Forbidden: teacher `https://api.example.com.evil.net/v1` is not allowed: this deployment sends data only to `http://127.0.0.1:8000` (our serving), `https://api.example.com/v1` (DISTILL_TEACHERS)
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from core.errors import ConfigError, Forbidden
from core.settings import Settings

TEACHER_FORM = "an http(s) API base URL such as `http://host:8000/v1`"


def allowed_teachers(settings: Settings) -> list[str]:
    """The allowed teacher base URLs, normalised: our serving, then DISTILL_TEACHERS."""
    listed = [settings.serving_url, *settings.distill_teachers]
    return list(dict.fromkeys(url.rstrip("/") for url in listed))


def _parts(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"`teacher={url}`: the teacher must be {TEACHER_FORM}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(
            f"`teacher={url}`: the teacher must be {TEACHER_FORM}, without a user, password, "
            "query or fragment (its key is the deployment's setting, never typed in Slack)"
        )
    return parts


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _under(url: SplitResult, base: SplitResult) -> bool:
    root = base.path.rstrip("/")
    path = url.path.rstrip("/")
    return (
        url.scheme == base.scheme
        and url.hostname == base.hostname
        and _port(url) == _port(base)
        and (path == root or path.startswith(root + "/"))
    )


def check_teacher(url: str, settings: Settings) -> str:
    """``url`` normalised if the deployment allows it as a teacher; ConfigError for a URL that
    is none, Forbidden (naming the allowed ones) for one that is not allowed."""
    parts = _parts(url.strip())
    allowed = allowed_teachers(settings)
    if not any(_under(parts, urlsplit(base)) for base in allowed):
        ours, *others = allowed
        names = f"`{ours}` (our serving)" + "".join(f", `{base}`" for base in others)
        raise Forbidden(
            f"teacher `{url}` is not allowed: this deployment sends data only to {names} "
            "(DISTILL_TEACHERS)"
        )
    return url.strip().rstrip("/")


def is_our_serving(url: str, settings: Settings) -> bool:
    return _under(urlsplit(url), urlsplit(settings.serving_url.rstrip("/")))


def teacher_api_key(url: str, settings: Settings) -> str | None:
    """The bearer token for teacher ``url`` (already checked): SERVING_API_KEY for our serving,
    DISTILL_API_KEY for any other."""
    secret = settings.serving_api_key if is_our_serving(url, settings) else settings.distill_api_key
    return secret.get_secret_value() if secret is not None else None
