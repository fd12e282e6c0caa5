"""Property test of the configuration loader: whatever the file holds (valid TOML of any shape
over the real sections and keys, or text that is hardly TOML), load_config returns a Config or
raises ConfigError with one ``FILE...`` line per problem; never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import _SCHEMA, Config, ConfigError, load_config

SECTIONS = [*_SCHEMA, "upstream", "bogus"]
KEYS = sorted({key for keys in _SCHEMA.values() for key in keys} | {"master_password_file", "x"})

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["127.0.0.1:0", "[::1]:995", "10.0.0.0/8", "TLSv1", "tls", "hide", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


documents = st.lists(
    st.tuples(st.sampled_from(SECTIONS), st.lists(st.tuples(st.sampled_from(KEYS), values))),
    max_size=6,
).map(
    lambda sections: "\n".join(
        f"[{section}]\n" + "".join(f"{key} = {toml_value(v)}\n" for key, v in dict(keys).items())
        for section, keys in dict(sections).items()
    )
)
junk = st.text(alphabet=st.sampled_from(list("[]=\"#.\n abc01:\\'{},")), max_size=80)


def check(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "popgate.toml"
        path.write_text(text, encoding="utf-8")
        try:
            config = load_config(path, environ={})
        except ConfigError as e:
            assert e.problems
            assert all(p.startswith(str(path)) for p in e.problems), e.problems
        else:
            assert isinstance(config, Config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_loads_or_gives_config_errors(text: str) -> None:
    check(text)


@settings(max_examples=150, deadline=None)
@given(junk)
def test_any_text_loads_or_gives_config_errors(text: str) -> None:
    check(text)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_SCHEMA["security"])), values, max_size=5))
def test_any_security_section_loads_or_gives_config_errors(section: dict[str, object]) -> None:
    check(
        '[upstream.imap]\nhost = "imap.example.com"\n[security]\n'
        + "".join(f"{key} = {toml_value(value)}\n" for key, value in section.items())
    )
