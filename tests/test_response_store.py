"""The in-memory store of /v1/responses: bounded (least recently used first) and with a time to live."""

from __future__ import annotations

import pytest

from slm.errors import PreviousResponseNotFound, RequestError
from slm.server.response_store import ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def put(store: ResponseStore, response_id: str) -> None:
    store.put({"id": response_id}, [{"role": "user", "content": response_id}])


def test_least_recently_used_goes_first() -> None:
    store = ResponseStore(max_responses=2, ttl=60, clock=Clock())
    put(store, "a")
    put(store, "b")
    store.get("a")  # now b is the least recently used
    put(store, "c")
    assert store.get("a").conversation == [{"role": "user", "content": "a"}]
    assert store.get("c").response == {"id": "c"}
    with pytest.raises(RequestError, match="'b'") as caught:
        store.get("b")
    assert caught.value.http_status == 404


def test_the_characters_held_are_bounded() -> None:
    store = ResponseStore(clock=Clock(), max_characters=10)
    put(store, "aaaa")
    put(store, "bbbb")
    put(store, "cccc")  # 12 characters: the oldest goes
    with pytest.raises(RequestError):
        store.get("aaaa")
    store.delete("bbbb")
    put(store, "x" * 20)  # alone beyond the bound: kept, the others go
    assert store.get("x" * 20)
    with pytest.raises(RequestError):
        store.get("cccc")


def test_expired_responses_are_gone() -> None:
    clock = Clock()
    store = ResponseStore(ttl=60, clock=clock)
    put(store, "a")
    clock.now = 59.9
    assert store.previous("a").response == {"id": "a"}
    clock.now = 60
    with pytest.raises(PreviousResponseNotFound, match="'a'") as caught:
        store.previous("a")
    assert caught.value.field == "previous_response_id"
    assert caught.value.http_status == 400


def test_delete() -> None:
    store = ResponseStore(clock=Clock())
    put(store, "a")
    store.delete("a")
    with pytest.raises(RequestError):
        store.get("a")
    with pytest.raises(RequestError, match="'a'"):
        store.delete("a")
