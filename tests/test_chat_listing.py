"""The chat listing (vila_m3.chat.listing): newest first, who sees what, pages, and chats stored before
owners, start times and study sources were recorded."""

from __future__ import annotations

import json
import os

import pytest

from vila_m3.chat.listing import MAX_LIMIT, ListingError, list_chats, short_title
from vila_m3.chat.store import Chat, ChatStore, ChatUser
from vila_m3.chat.transcript import Message

ALICE, BOB = ChatUser("alice"), ChatUser("bob")
ADMIN = ChatUser("ada", reads_all=True)
SESSION = "0b7c3f0e-6f1e-4c55-9d2a-5b7e8f9a1c2d"


def stored(store: ChatStore, chat_id: str, owner: str | None, question: str, mtime: float,
           study: dict | None = None, turns: int = 1, **extra) -> None:
    messages = []
    for number in range(turns):
        messages += [Message("user", f"card <image> {question} {number}", images=["a.png"],
                             question=f"{question}" if number == 0 else f"follow-up {number}"),
                     Message("assistant", "An answer.")]
    store.save(Chat(chat_id, study=study or {"image": "ct_abdomen", "source": "datastore"}, modality="CT",
                    messages=messages, owner=owner, **extra))
    os.utime(store.folder(chat_id) / "chat.json", (mtime, mtime))


def ids(chats) -> list[str]:
    return [chat.chat_id for chat in chats]


def test_newest_first_with_title_study_turns_and_times(tmp_path):
    store = ChatStore(tmp_path)
    stored(store, "older", None, "Is there a liver tumour?", 1_700_000_000, turns=2, created="2023-11-14T00:00:00Z")
    stored(store, "newer", None, "What is this?", 1_700_000_600,
           study={"image": SESSION, "source": "session"}, labels="labels_1.nii.gz")
    store.save(Chat("empty"))  # a chat without messages is nobody's yet: not listed
    chats, more = list_chats(store, None)
    assert ids(chats) == ["newer", "older"] and more is False
    newer, older = chats
    assert (newer.title, newer.study, newer.session, newer.turns, newer.has_labels) == (
        "What is this?", SESSION, True, 1, True)
    assert (older.title, older.study, older.session, older.turns, older.modality) == (
        "Is there a liver tumour?", "ct_abdomen", False, 2, "CT")
    assert older.updated == "2023-11-14T22:13:20Z" and older.created == "2023-11-14T00:00:00Z"
    assert newer.updated == "2023-11-14T22:23:20Z"


def test_login_on_lists_a_users_own_chats_and_every_chat_to_reviewers_and_admins(tmp_path):
    store = ChatStore(tmp_path)
    stored(store, "a1", "alice", "Alice's question", 1_700_000_000)
    stored(store, "b1", "bob", "Bob's question", 1_700_000_100)
    stored(store, "old", None, "Before owners", 1_700_000_200)
    assert ids(list_chats(store, ALICE)[0]) == ["a1"]
    assert ids(list_chats(store, BOB)[0]) == ["b1"]
    everything = list_chats(store, ADMIN)[0]
    assert ids(everything) == ["old", "b1", "a1"]
    assert [chat.owner for chat in everything] == [None, "bob", "alice"]
    assert ids(list_chats(store, None)[0]) == ["old", "b1", "a1"]  # login off: every chat is everyone's


def test_limit_and_offset_page_through_the_visible_chats(tmp_path):
    store = ChatStore(tmp_path)
    for number in range(5):
        stored(store, f"c{number}", "alice", f"Question {number}", 1_700_000_000 + number)
    stored(store, "theirs", "bob", "Not alice's", 1_700_000_010)
    first, more = list_chats(store, ALICE, limit=2)
    assert ids(first) == ["c4", "c3"] and more
    second, more = list_chats(store, ALICE, limit=2, offset=2)
    assert ids(second) == ["c2", "c1"] and more
    last, more = list_chats(store, ALICE, limit=2, offset=4)
    assert ids(last) == ["c0"] and not more
    for limit, offset in ((0, 0), (MAX_LIMIT + 1, 0), (10, -1)):
        with pytest.raises(ListingError, match="limit must be|offset must be"):
            list_chats(store, ALICE, limit=limit, offset=offset)


def test_chats_stored_before_start_times_and_sources_still_list(tmp_path):
    store = ChatStore(tmp_path)
    stored(store, "legacy", None, "An old question", 1_700_000_500, study={"image": SESSION})
    data = json.loads((tmp_path / "legacy" / "chat.json").read_text())
    del data["owner"]
    (tmp_path / "legacy" / "chat.json").write_text(json.dumps(data))
    (tmp_path / "legacy" / "picture.png").write_bytes(b"png")
    os.utime(tmp_path / "legacy" / "picture.png", (1_700_000_000, 1_700_000_000))
    os.utime(tmp_path / "legacy" / "chat.json", (1_700_000_500, 1_700_000_500))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "chat.json").write_text("{not json")
    [legacy], _ = list_chats(store, None)
    assert legacy.session is True  # a session id's shape, where the source was not recorded
    assert legacy.created == "2023-11-14T22:13:20Z" and legacy.updated == "2023-11-14T22:21:40Z"
    assert list_chats(store, ALICE)[0] == [] and ids(list_chats(store, ADMIN)[0]) == ["legacy"]


def test_a_new_chat_records_when_it_started(tmp_path):
    chat = ChatStore(tmp_path).load("fresh", ALICE, write=True)
    assert chat.created is not None and chat.created.endswith("Z") and chat.as_dict()["created"] == chat.created


def test_long_questions_make_short_one_line_titles():
    assert short_title("Is   there\na tumour?") == "Is there a tumour?"
    long = short_title("word " * 40)
    assert len(long) == 80 and long.endswith("…")


def test_a_bad_limit_is_refused_with_its_bounds(tmp_path):
    with pytest.raises(ListingError, match=f"limit must be a whole number from 1 to {MAX_LIMIT}, got 0"):
        list_chats(ChatStore(tmp_path), None, limit=0)
