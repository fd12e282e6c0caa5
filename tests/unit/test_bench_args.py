"""tests/bench/run's argument checks: a mistyped --scale or --scale-users value is an argparse
error (exit 2, the accepted values named), never a run that measures something else."""

from __future__ import annotations

import pytest

from tests.bench.runner import parse_args


def test_scale_users_accepts_one_many_and_the_comma_list() -> None:
    assert parse_args(["--scale", "50", "--scale-users", "one"]).workloads == ["scale-50-one"]
    assert parse_args(["--scale", "50,200", "--scale-users", "many"]).workloads == [
        "scale-50-many",
        "scale-200-many",
    ]
    args = parse_args(["--scale", "50", "--scale-users", "one,many"])
    assert args.scale_users == ["one", "many"]
    assert args.workloads == ["scale-50-one", "scale-50-many"]
    assert parse_args(["--scale", "50"]).scale_users == ["one", "many"]


@pytest.mark.parametrize("value", ["both", "one,bogus", "", ","])
def test_scale_users_refuses_anything_else(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--scale", "50", "--scale-users", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--scale-users" in err
    assert "'one', 'many' or 'one,many'" in err


@pytest.mark.parametrize("value", ["fifty", "50,x", "0", "-5", ""])
def test_scale_refuses_a_step_that_is_not_a_positive_count(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args([f"--scale={value}"])
    assert exit_.value.code == 2
    assert "--scale" in capsys.readouterr().err


def test_scale_users_without_scale_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--scale-users", "many"])
    assert exit_.value.code == 2
    assert "--scale-users applies only with --scale" in capsys.readouterr().err
    assert parse_args(["--quick"]).workloads[0] == "full"


def test_a_scale_workload_name_is_not_a_back_door(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--workloads", "scale-50-both"])
    assert exit_.value.code == 2
    assert "unknown workload 'scale-50-both'" in capsys.readouterr().err
