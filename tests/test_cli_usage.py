"""The command line as a new user meets it: every option explains itself, -v works after the
subcommand too."""

from __future__ import annotations

import argparse

from flows.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_option_has_a_help_text():
    parser = build_parser()
    missing = []
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_verbose_works_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "search", "q"]).verbose
    assert parser.parse_args(["search", "q", "-v"]).verbose
    assert parser.parse_args(["ingest", "docs", "--verbose"]).verbose
    assert not parser.parse_args(["search", "q"]).verbose


def test_too_few_ray_cpus_for_the_workers_is_refused_before_anything_runs():
    """Two actors holding 0.5 CPU each on a one-CPU instance leave none for the parse tasks:
    the run would wait forever, so the settings are refused with what to change."""
    import pytest
    from pydantic import ValidationError

    from tasks.settings import RunSettings

    with pytest.raises(ValidationError, match="ray_cpus=1 is too few for ray_workers=2"):
        RunSettings(runner="ray", ray_cpus=1, ray_workers=2)
    RunSettings(runner="ray", ray_cpus=1, ray_workers=1)  # 0.5 + 0.5
    RunSettings(runner="ray", ray_cpus=1, ray_workers=2, ray_address="auto")  # its own sizes


def test_the_ray_memory_budget_grows_with_the_embedding_workers_unless_it_is_given():
    """Blocks in flight queue around each embedding actor: 128 MB of object store each by
    default (a local instance's store is twice the budget); a given budget is kept, and one
    under 128 MB is refused."""
    import pytest
    from pydantic import ValidationError

    from tasks.settings import RunSettings

    assert RunSettings(runner="ray").ray_memory == 256  # two workers by default
    assert RunSettings(runner="ray", ray_workers=5).ray_memory == 640
    assert RunSettings(runner="ray", ray_workers=5, ray_memory_mb=512).ray_memory == 512
    with pytest.raises(ValidationError, match="ray_memory_mb"):
        RunSettings(runner="ray", ray_memory_mb=64)
