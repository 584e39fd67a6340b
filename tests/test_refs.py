import pytest

from adapterhub.errors import InvalidNameError
from adapterhub.refs import Ref, check_name, parse_target


@pytest.mark.parametrize(
    "text, expected",
    [
        ("qa-lora", Ref("qa-lora", tag="latest")),
        ("team/qa-lora:3", Ref("team/qa-lora", version="3")),
        ("team/qa-lora:1.2.0-rc.1+b5", Ref("team/qa-lora", version="1.2.0-rc.1+b5")),
        ("qa@prod", Ref("qa", tag="prod")),
        ("qa@sha256:" + "a" * 64, Ref("qa", digest="sha256:" + "a" * 64)),
    ],
)
def test_parse(text, expected):
    assert Ref.parse(text) == expected
    assert Ref.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "", "Qa", "../etc", "a/../b", "/abs", "a/b/c", ".hidden", "a b", "a" * 129,
        "qa:", "qa:../x", "qa@", "qa@sha256:abc", "qa:01", "qa@../x", "a\x00b", "a\\b",
    ],
)
def test_invalid_refs(bad):
    with pytest.raises(InvalidNameError):
        Ref.parse(bad)


def test_name_length_limit_message():
    with pytest.raises(InvalidNameError, match="128"):
        check_name("a" * 129)
    assert check_name("a" * 128)


def test_push_target_rejects_tags():
    assert parse_target("team/x:2") == ("team/x", "2")
    assert parse_target("team/x") == ("team/x", None)
    with pytest.raises(InvalidNameError):
        parse_target("team/x@prod")
