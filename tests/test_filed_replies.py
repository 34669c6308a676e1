"""The replies a link files for later waits, and the ones an abandoned dispatch leaves behind."""

import pytest

from moeshard.actors.filed_replies import FiledReplies


def test_a_filed_reply_is_taken_once():
    replies: FiledReplies[str] = FiledReplies()
    assert replies.file(1, "one") and 1 in replies
    assert replies.take(1) == "one" and 1 not in replies
    with pytest.raises(KeyError):
        replies.take(1)


def test_a_forgotten_reply_is_dropped_whether_filed_before_or_after():
    replies: FiledReplies[str] = FiledReplies()
    replies.file(1, "one")
    replies.forget(1)  # filed: dropped now
    replies.forget(2)  # not here yet: dropped when it comes
    assert not replies.file(2, "two")
    assert replies.file(3, "three")
    assert replies.filed == {3} and replies.forgotten == frozenset()
