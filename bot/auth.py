"""Who may promote, roll back and cancel others' jobs: ``APPROVERS`` user ids and the members of
its user groups (read with ``usergroups.users.list`` and cached)."""

from __future__ import annotations

import threading
import time
from typing import Any


class Approvers:
    def __init__(self, entries: list[str], client: Any, *, ttl_seconds: float = 300.0) -> None:
        self.users = {e for e in entries if not e.startswith("S")}
        self.groups = [e for e in entries if e.startswith("S")]
        self.client = client
        self.ttl = ttl_seconds
        self._members: set[str] = set()
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _group_members(self) -> set[str]:
        with self._lock:
            if self.groups and time.monotonic() - self._fetched > self.ttl:
                members: set[str] = set()
                for group in self.groups:
                    members.update(self.client.usergroups_users_list(usergroup=group)["users"])
                self._members, self._fetched = members, time.monotonic()
            return self._members

    def allows(self, user_id: str) -> bool:
        return user_id in self.users or user_id in self._group_members()
