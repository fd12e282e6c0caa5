"""Runs one fuzz target under atheris (libFuzzer): ``python -m tests.fuzz.one NAME [libFuzzer
options] [corpus dir]``. Started once per target by ``python -m tests.fuzz``."""

from __future__ import annotations

import sys

import atheris
from hypothesis import HealthCheck, settings

from tests.fuzz.targets import load

# Slow examples are expected under instrumentation; a failing one is written by libFuzzer to
# its artifact file, so Hypothesis need not keep a database of its own.
settings.register_profile(
    "fuzz", deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile("fuzz")


def main() -> None:
    name, options = sys.argv[1], sys.argv[2:]
    # Coverage feedback from popgate's own code: the target's imports of gateway.* are
    # instrumented as they load.
    with atheris.instrument_imports(include=["gateway"]):
        target = load(name)
    atheris.Setup([sys.argv[0], *options], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
