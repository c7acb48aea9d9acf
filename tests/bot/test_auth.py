"""APPROVERS: user ids always, user-group members read from Slack (the stand-in, over HTTP) and
cached; a Slack that cannot be asked never turns a refusal into an approval."""

from __future__ import annotations

import pytest
from slack_sdk import WebClient

from bot.auth import Approvers, ApproversUnknown
from bot.standin import SlackStandIn


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def standin():
    standin = SlackStandIn(usergroups={"S0GROUP": ["U0MEMBER"]})
    standin.start()
    yield standin
    standin.stop()


def _client(standin: SlackStandIn) -> WebClient:
    return WebClient(token=standin.bot_token, base_url=standin.api_url)


def test_group_members_are_read_on_a_freshly_booted_host(standin) -> None:
    # time.monotonic() counts from boot: a host up for 12 s once never read the groups (TTL 300 s).
    approvers = Approvers(["U0LISTED", "S0GROUP"], _client(standin), clock=Clock(12.0))
    assert approvers.allows("U0MEMBER") and approvers.allows("U0LISTED")
    assert not approvers.allows("U0STRANGER")
    assert len(standin.calls_to("usergroups.users.list")) == 1  # cached for the TTL


def test_slack_down_uses_the_last_list_read_and_refuses_clearly_without_one(standin) -> None:
    clock = Clock(1000.0)
    approvers = Approvers(["S0GROUP"], _client(standin), ttl_seconds=60, clock=clock)
    standin.inject("usergroups.users.list", status=500, retry_after=None, times=5)
    with pytest.raises(ApproversUnknown, match="could not be read from Slack"):
        approvers.allows("U0MEMBER")
    standin._faults.clear()
    assert approvers.allows("U0MEMBER")
    clock.now += 120  # the cache is stale and Slack fails again: the last list still decides
    standin.inject("usergroups.users.list", status=500, retry_after=None, times=5)
    assert approvers.allows("U0MEMBER") and not approvers.allows("U0STRANGER")


def test_listed_users_need_no_slack_call(standin) -> None:
    standin.inject("usergroups.users.list", status=500, retry_after=None, times=5)
    approvers = Approvers(["U0LISTED"], _client(standin))
    assert approvers.allows("U0LISTED")
    assert standin.calls_to("usergroups.users.list") == []
