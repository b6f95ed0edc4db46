"""Each CLI default lives once: every option of every command is checked against the config field it sets.

An option made with ``field_option`` / ``unset_option`` (astrea/cli/_defaults.py) names its field; any
other option with a literal default must agree with the same-named field of its command's config, or be
listed in CLI_ONLY with why it has no config field. So a literal that disagrees with the config fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.models import OptionInfo
from typer.testing import CliRunner
from typer.utils import get_params_from_function

from astrea.cli import app
from astrea.cli._defaults import ShownDefault, field_default, show

# The config (dataclass, or function for `data sample`) each command's options set.
COMMAND_CONFIGS = {
    "extract": "astrea.extract.config:ExtractConfig",
    "train": "astrea.train.config:TrainConfig",
    "sweep": "astrea.train.config:TrainConfig",
    "eval": "astrea.train.eval:EvalConfig",
    "report": "astrea.train.eval:EvalConfig",
    "generate": "astrea.generate:GenerateConfig",
    "demo": "astrea.demo:DemoConfig",
    "experts ls": "astrea.extract.experts.registry:ExpertConfig",
    "shards estimate": "astrea.extract.estimate:EstimateConfig",
    "shards convert": "astrea.shards.convert:ConvertConfig",
    "data sample": "astrea.data.sample:ensure_sample",
    "data instructions": "astrea.train.instructions:InstructionConfig",
}
# Options with a literal default and no config field: the default belongs to the CLI alone.
CLI_ONLY = {
    ("data instructions", "limit"): "how many unmatched records are printed",
}


def _sets_nothing(default: Any) -> bool:
    """Required (...), not given (None), an empty repeatable ([]), a flag left off (False; not 0, which == False)."""
    return default is None or default is Ellipsis or default is False or (isinstance(default, list) and not default)


def _commands(t: typer.Typer, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    out = []
    for c in t.registered_commands:
        out.append((" ".join((*path, c.name or c.callback.__name__)), c.callback))
    for g in t.registered_groups:
        out.extend(_commands(g.typer_instance, (*path, g.name)))
    return out


def _names(param: str, info: OptionInfo) -> list[str]:
    """The field names an option may set: its parameter name and its long flags (``--format`` -> format)."""
    flags = [d for decl in info.param_decls for d in decl.split("/") if d.startswith("--")]
    return [param, *(f[2:].replace("-", "_") for f in flags)]


def _fields(target: str) -> dict[str, Any]:
    import dataclasses
    import importlib
    import inspect

    module, _, name = target.partition(":")
    owner = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(owner):
        return {f.name: field_default(f"{target}.{f.name}") for f in dataclasses.fields(owner)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(owner).parameters.items() if p.default is not p.empty}


def default_problems(t: typer.Typer, configs: dict[str, str], cli_only: dict) -> list[str]:
    """Every option default of ``t``'s commands that disagrees with its config (or has no config)."""
    problems = []
    for name, callback in _commands(t):
        fields = _fields(configs[name]) if name in configs else {}
        for param, meta in get_params_from_function(callback).items():
            info = meta.default
            if not isinstance(info, OptionInfo):
                continue
            where = f"astrea {name} --{_names(param, info)[-1].replace('_', '-')}"
            target = getattr(info, "config_field", None)
            if target is not None:
                want = field_default(target)
                if info.default is None:  # not given: the config decides; --help must show the config's default
                    if isinstance(info.show_default, ShownDefault) and str(info.show_default) != show(want):
                        problems.append(f"{where}: --help shows {info.show_default!s}, {target} is {want!r}")
                elif info.default != want:
                    problems.append(f"{where}: default {info.default!r}, but {target} is {want!r}")
                continue
            if info.default is None or info.default is Ellipsis or info.default == []:
                continue
            match = next((n for n in _names(param, info) if n in fields), None)
            if match is not None:
                if info.default != fields[match]:
                    problems.append(f"{where}: literal default {info.default!r}, but {configs[name]}.{match} "
                                    f"is {fields[match]!r} (use field_option/unset_option from astrea.cli._defaults)")
            elif not _sets_nothing(info.default) and (name, param) not in cli_only:
                problems.append(f"{where}: literal default {info.default!r} sets no config field; bind it with "
                                "field_option/unset_option, or list it in CLI_ONLY with why")
    return problems


def test_every_cli_default_is_its_config_fields():
    assert default_problems(app, COMMAND_CONFIGS, CLI_ONLY) == []


def test_the_check_sees_every_command_and_option():
    names = {n for n, _ in _commands(app)}
    assert set(COMMAND_CONFIGS) <= names
    bound = [p for _, cb in _commands(app) for p, m in get_params_from_function(cb).items()
             if getattr(m.default, "config_field", None)]
    assert len(bound) >= 40, bound  # the walk reached the options (a wrong walk would pass vacuously)


def test_the_check_fails_on_a_literal_that_disagrees():
    """A planted disagreement in each form the check knows is reported."""
    from astrea.cli._defaults import field_option, unset_option

    planted = typer.Typer()

    @planted.command("extract")
    def extract(
        grid: int = typer.Option(25, "--grid"),  # a literal: ExtractConfig.grid is 24
        fmt: str = typer.Option("wds", "--format"),  # matched through its flag name
        cpus: float = typer.Option(0.0, "--cpus"),  # no field of that name, not in CLI_ONLY (0.0 == False)
        seed: int = field_option("astrea.extract.config:ExtractConfig.seed", "--seed"),  # bound: agrees
    ) -> None: ...

    @planted.command("train")
    def train(
        lr: float = typer.Option(1e-3, "--lr", help="a literal where None means 'the config decides'"),
        steps: int = unset_option("astrea.train.config:TrainConfig.steps", "--steps"),  # agrees
    ) -> None: ...

    bad = field_option("astrea.extract.config:ExtractConfig.batch_size", "--batch-size")
    bad.default = 9  # as if someone edited the value after binding it

    @planted.command("experts")
    def experts(batch_size: int = bad) -> None: ...

    problems = default_problems(planted, {"extract": "astrea.extract.config:ExtractConfig",
                                          "train": "astrea.train.config:TrainConfig"}, {})
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "--grid: literal default 25" in text and "ExtractConfig.grid is 24" in text
    assert "--format: literal default 'wds'" in text and "ExtractConfig.format is 'zarr'" in text
    assert "--cpus: literal default 0.0 sets no config field" in text
    assert "--batch-size: default 9, but astrea.extract.config:ExtractConfig.batch_size is 8" in text
    assert "--lr: literal default 0.001 sets no config field" in text  # TrainConfig's is optim.lr


@pytest.mark.parametrize("command,flag,target", [
    ("train", "--lr", "astrea.train.config:TrainConfig.optim.lr"),
    ("train", "--top-k", "astrea.train.config:TrainConfig.moe.top_k"),
    ("extract", "--grid", "astrea.extract.config:ExtractConfig.grid"),
    ("eval", "--max-samples", "astrea.train.eval:EvalConfig.max_samples"),
])
def test_help_shows_the_config_default(command, flag, target):
    out = CliRunner().invoke(app, [command, "--help"], terminal_width=250, env={"COLUMNS": "250"}).output
    lines = out.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("│") and f" {flag} " in ln)  # the options table
    block = [lines[first]]  # the option's row and its wrapped lines (up to the next option)
    for ln in lines[first + 1:]:
        if " --" in ln[:30] or "╰" in ln:
            break
        block.append(ln)
    text = " ".join(block)
    value = show(field_default(target))
    assert f"default: {value}]" in text or f"default: ({value})]" in text, text  # (...): shown for an option left None


def test_help_keeps_every_default_stated_in_words():
    """A default stated in an option's help text (``[default: the run's newest]``) reaches the user: rich
    reads an unescaped ``[default: ...]`` as markup and drops it from --help."""
    import re

    for name, callback in _commands(app):
        out = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=1000, env={"COLUMNS": "1000"}).output
        for param, meta in get_params_from_function(callback).items():
            for stated in re.findall(r"\[default: ([^\]]+)\]", getattr(meta.default, "help", None) or ""):
                assert f"[default: {stated}]" in out, f"astrea {name} --help lost the default of {param}: {stated}"


def test_bound_overrides_maps_each_bound_option_to_its_field_once():
    """The flag -> field mapping lives on the option: a command's overrides come from it, paths as str."""
    from pathlib import Path
    from typing import Optional

    from astrea.cli._defaults import bound_overrides, unset_option

    T = "astrea.train.config:TrainConfig."

    def cmd(
        out: Optional[Path] = unset_option(T + "out", "--out"),
        lr: Optional[float] = unset_option(T + "optim.lr", "--lr"),
        top_k: Optional[int] = unset_option(T + "moe.top_k", "--top-k"),
        other: bool = False,
    ) -> None:
        pass

    got = bound_overrides(cmd, {"out": Path("/tmp/r"), "lr": 0.5, "top_k": None, "other": True})
    assert got == {"out": "/tmp/r", "optim.lr": 0.5, "moe.top_k": None}


def test_astrea_train_passes_every_bound_flag_through():
    """`astrea train`: each option that names a field is in the overrides (none forgotten in a hand dict)."""
    import inspect

    from astrea.cli.train import train

    bound = [n for n, p in inspect.signature(train).parameters.items() if getattr(p.default, "config_field", None)]
    assert {"lr", "steps", "seed", "top_k", "llm", "batch_size"} <= set(bound)
    src = inspect.getsource(train)
    assert "bound_overrides(train, locals())" in src
    for name in bound:  # no second, hand-written mapping of a bound flag
        assert f": {name}," not in src, name
    from astrea.train.config import SHORTHANDS

    top_k = inspect.signature(train).parameters["top_k"].default.config_field
    assert top_k.endswith("TrainConfig." + SHORTHANDS["top_k"][0])
