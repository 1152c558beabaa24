"""Brace patterns expand as bash expands them: bash itself is the reference."""

import shutil
import subprocess

import pytest

from data_tools.brace_patterns import balanced, expand

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is the reference")


def _bash(pattern: str) -> list:
    return subprocess.run([BASH, "-c", f"printf '%s\\n' {pattern}"], capture_output=True, text=True, check=True,
                          env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}).stdout.splitlines()


@needs_bash
@pytest.mark.parametrize("pattern", [
    "https://h/laion-{00000..23999}.tar", "https://h/a-{01..100}.tar", "https://h/a-{9..011}.tar",
    "https://h/a-{-05..3}.tar", "https://h/a-{5..1}.tar", "https://h/a-{1..10..2}.tar", "https://h/{a..e}.tar",
    "https://h/x{a,b{1,2},c}y.tar", "https://h/x{a,}.tar", "https://h/{train,val}/part-{00..11}.tar",
    "https://h/a-{+1..3}.tar", "https://h/a-{1..10..-3}.tar", "https://h/a-{3..1..0}.tar", "https://h/a-{00..-2}.tar",
    "https://h/a-{-0..2}.tar", "https://h/{e..a..2}.tar",
    # left as written by bash: no range, no comma, or not ASCII digits
    "https://h/{a}.tar", "https://h/{}.tar", "https://h/{1..3..a}.tar", "https://h/{0x1..3}.tar",
    "https://h/{a..5}.tar", "https://h/{\u0660..\u0662}.tar", "https://h/{a{1,2}}.tar",
])
def test_expansion_is_bash_s(pattern):
    ours, reference = list(expand(pattern)), _bash(pattern)
    if len(reference) > 1000:  # the 24000 shards: the count and both ends are enough
        ours, reference = (len(ours), ours[0], ours[-1]), (len(reference), reference[0], reference[-1])
    assert ours == reference


@needs_bash
@pytest.mark.parametrize("pattern", ["a{b\\,c}", "a{b\\,c,d}", "a\\{b,c\\}", "a{b,c\\}d}", "\\\\{a,b}"])
def test_escapes_are_kept_for_the_shell_and_mean_what_they_mean_to_bash(pattern):
    # Each name reaches sh as written, backslashes included: after sh's quote removal, bash's words.
    shell = [subprocess.run(["/bin/sh", "-c", f"printf '%s\\n' {name}"], capture_output=True, text=True,
                            check=True).stdout.rstrip("\n") for name in expand(pattern)]
    assert shell == _bash(pattern)


def test_escaped_commas_and_groups_with_whitespace_are_no_lists():
    # Was: split at the escaped comma, into two broken commands.
    for literal in ["pipe:cat a{b\\,c}", "awk 'BEGIN{ OFS=\",\" }{print}'", "awk 'BEGIN{OFS=\"\\,\"}{print}'",
                    "awk '{print $1, $2}'", "echo ${V:-a,b}"]:
        assert list(expand(literal)) == [literal]
    # Quotes do not stop expansion (webdataset users quote URLs for the shell, and mean the range).
    assert list(expand("curl -s 'https://h/a-{0..2}.tar'")) == [f"curl -s 'https://h/a-{i}.tar'" for i in range(3)]


def test_balance_ignores_escaped_braces():
    assert balanced("a\\{b") and balanced("{a,\\}}") and balanced("\\\\{a,b}")
    assert not balanced("{a") and not balanced("a}{") and not balanced("\\\\{a")
