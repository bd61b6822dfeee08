"""`llm4es --help`, a subcommand's `--help` and an option error import no stage and no heavy library,
and the option defaults the CLI reads from the configs' source are the configs' own."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from producers.cli import cli
from producers.cli.defaults import config_defaults, module_constant
from producers.errors import Llm4esError

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "transformers", "duckdb", "pyarrow", "feast", "great_expectations", "sklearn", "lightgbm", "ptls",
         "pandas", "numpy"]
# argv, and the exit code click gives it (2: a usage error)
RUNS = [(["--help"], 0), (["refresh", "--help"], 0), (["embed", "--help"], 0), (["intents", "label", "--help"], 0),
        (["sessions", "train", "--help"], 0), (["embed"], 2), (["embed", "ds", "--kind", "nope"], 2),
        (["--home", "/nonexistent/llm4es", "coles", "ds", "--epochs", "0"], 2), (["no-such-command"], 2)]

# One interpreter runs them in turn, as `python -m producers.cli ARGS` does, and says after each
# which modules are loaded (cumulative: the first run that loads a module is the one to blame).
SCRIPT = """
import json, runpy, sys
runs = json.loads(sys.argv[1])
for argv, _ in runs:
    sys.argv = ["llm4es", *argv]
    try:
        runpy.run_module("producers.cli", run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    print(json.dumps({"argv": argv, "code": code, "modules": sorted(sys.modules)}), file=sys.__stderr__)
"""


def test_help_and_option_errors_import_no_stage_and_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(RUNS)], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LLM4ES_HOME": "/nonexistent/llm4es"},
                         timeout=120)
    reports = [json.loads(line) for line in out.stderr.splitlines() if line.startswith('{"argv"')]
    assert len(reports) == len(RUNS), out.stderr
    for (argv, code), report in zip(RUNS, reports):
        assert report["code"] == code, (argv, out.stderr)
        modules = set(report["modules"])
        assert [m for m in HEAVY if m in modules] == [], argv
        ours = {m for m in modules if m.split(".")[0] in ("producers", "training", "validation", "feature_repo")}
        assert {m for m in ours if not m.startswith("producers.cli")} <= {"producers", "producers.errors"}, argv
    assert not Path("/nonexistent/llm4es").exists()


# The (module, class) pairs the CLI reads defaults of: every `config_defaults("m", "C")` in its source.
def _cli_configs() -> list[tuple[str, str]]:
    pairs = set()
    for path in (ROOT / "producers" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "config_defaults":
                pairs.add(tuple(ast.literal_eval(arg) for arg in node.args))
    return sorted(pairs)


LITERAL = (int, float, str, bool, type(None), tuple)


@pytest.mark.parametrize(("module", "cls"), _cli_configs())
def test_defaults_read_from_source_are_the_dataclass_defaults(module, cls):
    real = getattr(importlib.import_module(module), cls)
    read = config_defaults(module, cls)
    for f in dataclasses.fields(real):
        if f.default is dataclasses.MISSING or not isinstance(f.default, LITERAL):
            with pytest.raises(AttributeError, match=f"{cls}.{f.name} has no literal default"):
                getattr(read, f.name)
        else:
            value = getattr(read, f.name)
            assert (value, type(value)) == (f.default, type(f.default)), f.name


def test_the_cli_reads_every_config_it_names():
    assert len(_cli_configs()) >= 17


def test_module_constant_follows_an_import():
    from producers.shared.models import DEFAULT_MODEL

    assert module_constant("training.embed.config", "DEFAULT_MODEL") == DEFAULT_MODEL
    with pytest.raises(LookupError, match="Path is not a literal constant"):
        module_constant("training.embed.store", "Path")


# Each command's options named like a field of its config(s) show that field's default.
COMMAND_CONFIGS = {
    ("synth-clicks",): ["producers.synthetic.clickstream:ClickstreamConfig"],
    ("ingest",): ["producers.ingest.run:IngestConfig"],
    ("validate",): ["validation.run:ValidateConfig"],
    ("serialize",): ["producers.serialize.run:SerializeConfig"],
    ("aggregate",): ["producers.aggregate:AggregateConfig"],
    ("enrich",): ["producers.enrich.run:EnrichConfig", "producers.enrich.options:LLMOptions"],
    ("finetune",): ["training.finetune.config:FinetuneConfig"],
    ("embed",): ["training.embed.config:EmbedConfig"],
    ("coles",): ["producers.coles.config:ColesConfig"],
    ("sessions", "build"): ["producers.sessions.config:SessionsConfig"],
    ("sessions", "train"): ["producers.sessions.config:SessionEncoderConfig"],
    ("sessions", "embed"): ["producers.sessions.config:SessionEncoderConfig"],
    ("intents", "build"): ["producers.intents.config:TaxonomyConfig", "producers.intents.config:TextConfig"],
    ("intents", "label"): ["producers.intents.config:LabelConfig", "producers.intents.config:TextConfig"],
    ("intents", "distill"): ["producers.intents.config:DistillConfig", "producers.intents.config:TextConfig"],
    ("publish",): ["producers.publish.flow:PublishConfig"],
    ("evaluate",): ["training.evaluate.run:EvaluateConfig"],
}


# None: the feature sets that are published; the config's () is "the default sets" too, said by the caller.
DIFFERENT_ON_PURPOSE = {(("evaluate",), "features")}


@pytest.mark.parametrize("path", list(COMMAND_CONFIGS))
def test_option_defaults_are_the_config_defaults(path):
    command = cli
    for name in path:
        command = command.commands[name]
    configs = [getattr(importlib.import_module(m), c) for m, c in (spec.split(":") for spec in COMMAND_CONFIGS[path])]
    checked = 0
    for param in command.params:
        if getattr(param, "is_flag", True) or param.multiple or (path, param.name) in DIFFERENT_ON_PURPOSE:
            continue
        fields = [f for config in configs for f in dataclasses.fields(config) if f.name == param.name]
        if not fields or fields[0].default is dataclasses.MISSING or isinstance(fields[0].default, datetime):
            continue
        default = fields[0].default
        if not isinstance(default, LITERAL):
            continue
        assert param.default == default, (path, param.name)
        checked += 1
    assert checked, path  # the options still share the configs' field names


def test_help_shows_a_default_read_from_source():
    from training.embed import EmbedConfig

    result = CliRunner().invoke(cli, ["embed", "--help"])
    assert result.exit_code == 0
    assert f"[default: {EmbedConfig.layers}]" in result.output


def test_a_class_whose_body_does_not_parse_alone_is_read_from_the_whole_file(tmp_path, monkeypatch):
    (tmp_path / "cfgmod.py").write_text('''
from dataclasses import dataclass, field

LIMIT = 7


@dataclass
class Config:
    """A docstring with a line at column 0:
a config defined in a module this test writes.
"""
    n: int = LIMIT
    name: str | None = field(default=None)
    items: list = field(default_factory=list)
    start: object = object()
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    read = config_defaults("cfgmod", "Config")
    assert (read.n, read.name) == (7, None)
    for name in ("items", "start"):
        with pytest.raises(AttributeError, match=f"cfgmod.Config.{name} has no literal default in .*cfgmod.py"):
            getattr(read, name)
    with pytest.raises(LookupError, match="no class Other"):
        config_defaults("cfgmod", "Other")
    assert "cfgmod" not in sys.modules  # read, not imported


class RecordingPipeline:
    """Stands in for the Pipeline: records the config a stage is called with, then stops the command."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, stage):
        def call(dataset, config, *rest):
            self.calls.append((stage, config))
            raise Llm4esError("recorded")

        return call


# With no options, each command builds its stage's config from the defaults it read from source:
# the same config as the dataclass's own defaults (the stage classes are imported only in the body).
NO_OPTIONS = [
    (("embed",), "training.embed.config:EmbedConfig"),
    (("finetune",), "training.finetune.config:FinetuneConfig"),
    (("coles",), "producers.coles.config:ColesConfig"),
    (("publish",), "producers.publish:PublishConfig"),
    (("evaluate",), "training.evaluate:EvaluateConfig"),
    (("sessions", "train"), "producers.sessions.config:SessionEncoderConfig"),
    (("intents", "label"), "producers.intents.config:LabelConfig"),
    (("intents", "distill"), "producers.intents.config:DistillConfig"),
]


@pytest.mark.parametrize(("path", "config"), NO_OPTIONS)
def test_a_command_without_options_runs_its_stage_with_the_default_config(path, config):
    command = cli
    for name in path:
        command = command.commands[name]
    p = RecordingPipeline()
    result = CliRunner().invoke(command, ["ds"], obj=p)
    assert result.exit_code == 1 and "recorded" in result.output, result.output
    module, cls = config.split(":")
    ((_, made),) = p.calls
    assert made == getattr(importlib.import_module(module), cls)()
