"""Who may open a chat (vila_m3.chat.store): the owner, reviewers and admins for reading, nobody else."""

from __future__ import annotations

import json

import pytest

from vila_m3.chat.store import Chat, ChatNotFound, ChatStore, ChatUser, may_open
from vila_m3.chat.transcript import Message

pytestmark = pytest.mark.security

ALICE, BOB = ChatUser("alice"), ChatUser("bob")
REVIEWER = ChatUser("rita", reads_all=True)


def stored_chat(store: ChatStore, owner: str | None, chat_id: str = "c1") -> Chat:
    chat = Chat(chat_id, messages=[Message("user", "What is this?"), Message("assistant", "A CT.")], owner=owner)
    store.save(chat)
    return chat


def test_the_owner_may_read_and_continue_others_may_not(tmp_path):
    store = ChatStore(tmp_path)
    stored_chat(store, "alice")
    assert store.load("c1", ALICE, write=True).owner == "alice"
    for write in (False, True):
        with pytest.raises(ChatNotFound, match="no chat 'c1'"):
            store.load("c1", BOB, write=write)


def test_reviewers_and_admins_read_every_chat_but_continue_none(tmp_path):
    store = ChatStore(tmp_path)
    stored_chat(store, "alice")
    assert len(store.load("c1", REVIEWER).messages) == 2
    with pytest.raises(ChatNotFound):
        store.load("c1", REVIEWER, write=True)


def test_a_new_chat_belongs_to_whoever_starts_it(tmp_path):
    store = ChatStore(tmp_path)
    assert store.load("fresh", BOB, write=True).owner == "bob"
    assert store.load("fresh").owner is None  # login off


def test_with_login_off_every_chat_is_everyones(tmp_path):
    store = ChatStore(tmp_path)
    stored_chat(store, "alice")
    assert store.load("c1", None, write=True).owner == "alice"


def test_chat_files_without_an_owner_still_load_and_are_closed_to_signed_in_users(tmp_path):
    store = ChatStore(tmp_path)
    chat = stored_chat(store, None)
    data = chat.as_dict()
    del data["owner"]  # written before chats had owners
    (tmp_path / "c1" / "chat.json").write_text(json.dumps(data))
    assert store.load("c1").owner is None and len(store.load("c1").messages) == 2
    assert not may_open(store.load("c1"), ALICE)
    assert may_open(store.load("c1"), REVIEWER) and not may_open(store.load("c1"), REVIEWER, write=True)
