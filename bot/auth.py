"""Who may promote, roll back, export and cancel others' jobs: ``APPROVERS`` user ids and the
members of its user groups (read with ``usergroups.users.list`` and cached for ``ttl_seconds``).

When Slack cannot be asked (it is down, the token lacks ``usergroups:read``), the last list read is
used; with no list read yet, a group member is refused with a message saying why (a user listed by
id is always allowed: no Slack call is needed for them).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from core.errors import Forbidden

log = logging.getLogger(__name__)


class ApproversUnknown(Forbidden):
    """The approver groups could not be read from Slack and no earlier list is known."""


class Approvers:
    def __init__(
        self,
        entries: list[str],
        client: Any,
        *,
        ttl_seconds: float = 300.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.users = {e for e in entries if not e.startswith("S")}
        self.groups = [e for e in entries if e.startswith("S")]
        self.client = client
        self.ttl = ttl_seconds
        self.clock = clock
        self._members: set[str] | None = None  # None: never read
        self._fetched: float | None = None
        self._lock = threading.Lock()

    def _group_members(self) -> set[str]:
        with self._lock:
            fresh = self._fetched is not None and self.clock() - self._fetched <= self.ttl
            if not self.groups or fresh:
                return self._members or set()
            try:
                members: set[str] = set()
                for group in self.groups:
                    members.update(self.client.usergroups_users_list(usergroup=group)["users"])
            except Exception as exc:  # SlackApiError, a connection error: Slack could not say
                if self._members is not None:
                    log.warning(
                        "reading the approver groups from Slack failed (%s); using the list "
                        "read before",
                        type(exc).__name__,
                    )
                    return self._members
                log.error("reading the approver groups from Slack failed: %s", exc)
                raise ApproversUnknown(
                    "the approver groups could not be read from Slack (is Slack reachable, and "
                    "does the app have the usergroups:read scope?); nothing was changed: try "
                    "again in a minute"
                ) from exc
            self._members, self._fetched = members, self.clock()
            return members

    def allows(self, user_id: str) -> bool:
        """Whether ``user_id`` is an approver; raises ApproversUnknown when that cannot be told."""
        return user_id in self.users or user_id in self._group_members()
