"""The fuzz targets: the project's own property tests, driven by a coverage-guided fuzzer.

Each target is a Hypothesis ``@given`` test from tests/unit. ``fuzz_one_input`` lets an outside
fuzzer choose the bytes Hypothesis draws from, so the properties checked in CI (small budget)
are the same ones the long run explores; there is no second copy of any rule here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name: (module under tests/unit, test function); what each one feeds and checks is in its
# docstring there.
TARGETS: dict[str, tuple[str, str]] = {
    "pop3-session": ("test_pop3_session_fuzz", "test_any_input_in_any_chunking_keeps_every_rule"),
    "pop3-raw": (
        "test_pop3_session_fuzz",
        "test_raw_bytes_in_any_chunking_never_raise_and_each_answer_is_whole",
    ),
    "imap-responses": (
        "test_imap_wire",
        "test_any_bytes_from_the_server_give_events_or_a_response_error",
    ),
    "imap-chunking": ("test_imap_wire", "test_any_chunking_gives_the_same_events"),
    "imap-strings": ("test_imap_wire", "test_any_string_round_trips_through_the_parser"),
    "dotstuff": ("test_dotstuff", "test_round_trip_over_any_chunking"),
    "sasl": ("test_sasl", "test_any_response_gives_credentials_or_a_sasl_error"),
    "device-state": ("test_device_state_forged", "test_any_bytes_raise_only_invalid_state"),
    "uid-sets": (
        "test_device_state_forged",
        "test_uid_text_of_any_width_parses_in_memory_bounded_by_its_length",
    ),
    "config-text": ("test_config_property", "test_any_text_loads_or_gives_config_errors"),
    "config-document": ("test_config_property", "test_any_document_loads_or_gives_config_errors"),
    "config-security": (
        "test_config_property",
        "test_any_security_section_loads_or_gives_config_errors",
    ),
}


def load(name: str) -> Callable[[bytes], Any]:
    """The target's ``fuzz_one_input``: bytes in; raises what the property test would."""
    module_name, function = TARGETS[name]
    module = importlib.import_module(f"tests.unit.{module_name}")
    test = getattr(module, function)
    return test.hypothesis.fuzz_one_input  # type: ignore[no-any-return]
