"""``normalize`` finds refused characters with one regex scan: the same verdicts as the
per-character test it replaced, for every code point and on random paths (hypothesis)."""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import paths
from kernel.policy import WritePolicy

LIMITS = WritePolicy()
VIEW = "/workspace"


def test_regex_refuses_exactly_the_bad_characters() -> None:
    for cp in range(0x110000):
        c = chr(cp)
        assert (paths._BAD_CHAR_RE.search(c) is not None) == paths._bad_char(c), hex(cp)


def _ref_bad_bytes(raw: str) -> paths.Violation | None:
    for i, c in enumerate(raw):
        if paths._bad_char(c):
            what = "NUL" if c == "\x00" else f"control or undecodable character {ord(c):#x}"
            return ("path.bad_bytes", f"path contains {what} at index {i}", errno.EINVAL)
    return None


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.one_of(st.characters(codec=None), st.sampled_from(
    ["/", ".", "a", "\x00", "\x1f", "\x7f", "\x9f", "\xa0", "\ud800", "\udfff"])), max_size=30))
def test_normalize_reports_the_first_bad_character(raw: str) -> None:
    want = _ref_bad_bytes(raw)
    got = paths.normalize(raw, view_root=VIEW, limits=LIMITS)
    if want is not None:
        assert got == want
    else:
        assert not (isinstance(got, tuple) and got[0] == "path.bad_bytes")
