"""`entraflow flower` starts Flower on this deployment's broker, behind basic auth."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from flower_process import CREDENTIALS, running_flower

pytestmark = pytest.mark.integration


@pytest.fixture
def flower_url(redis_url: str) -> Iterator[str]:
    with running_flower(redis_url) as url:
        yield url


def test_flower_answers_only_with_the_configured_credentials(flower_url: str) -> None:
    assert requests.get(f"{flower_url}/api/workers", timeout=10).status_code == 401
    assert requests.get(f"{flower_url}/tasks", timeout=10).status_code == 401
    answer = requests.get(f"{flower_url}/api/workers", auth=CREDENTIALS, timeout=10)
    assert answer.status_code == 200
    assert isinstance(answer.json(), dict)


def test_flower_refuses_wrong_credentials(flower_url: str) -> None:
    wrong = (CREDENTIALS[0], "not-the-password")
    assert requests.get(f"{flower_url}/api/tasks", auth=wrong, timeout=10).status_code == 401
