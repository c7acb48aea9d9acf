"""Slack event ids already handled (Slack retries events; each must count once)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from storage.models import SlackEvent


def claim_slack_event(session: Session, *, event_id: str) -> bool:
    """True the first time ``event_id`` is seen, False for Slack's retries of it."""
    session.add(SlackEvent(event_id=event_id))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True
