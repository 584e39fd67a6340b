import pytest

from adapterhub.errors import InvalidNameError
from adapterhub.refs import Ref, check_digest, check_name, check_tag, check_version, parse_target


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


@pytest.mark.parametrize("version", ["3", "1.2.0", "2.0.0-rc.1+build.5", "2026.12.07", "v2", "v1.2.0"])
def test_versions_start_with_a_digit(version):
    assert parse_target(f"team/x:{version}") == ("team/x", version)
    assert Ref.parse(f"team/x:{version}").version == version


@pytest.mark.parametrize("word", ["prod", "stable", "latest", "beta-1", "vnext"])
def test_a_word_after_the_colon_is_refused_with_the_tag_hint(word):
    with pytest.raises(InvalidNameError) as e:
        parse_target(f"team/x:{word}")
    assert f"did you mean `--tag {word}`?" in e.value.hint


@pytest.mark.parametrize(
    "check, value",
    [
        (check_name, "team/x\n"),
        (check_name, "qa\n"),
        (check_version, "1\n"),
        (check_version, "1.2.0\n"),
        (check_tag, "prod\n"),
        (check_digest, "sha256:" + "a" * 64 + "\n"),
    ],
)
def test_a_trailing_newline_is_refused(check, value):
    with pytest.raises(InvalidNameError):
        check(value)


@pytest.mark.parametrize("text", ["qa\n", "qa:1\n", "qa@prod\n", "team/x@sha256:" + "a" * 64 + "\n", " qa"])
def test_refs_are_matched_whole(text):
    with pytest.raises(InvalidNameError):
        Ref.parse(text)


def test_a_key_name_with_a_trailing_newline_is_refused():
    from adapterhub.trust.keys import check_key_name

    assert check_key_name("alice") == "alice"
    for bad in ("alice\n", "alice\n\n", "\nalice"):
        with pytest.raises(InvalidNameError):
            check_key_name(bad)


def test_push_target_with_a_newline_is_refused():
    for text in ("team/x\n", "team/x:2\n"):
        with pytest.raises(InvalidNameError):
            parse_target(text)
