"""The CLI's parser: Lightning's, naming the command as the user typed it, with a bad option as one sentence (the
option, what it accepts, the value given) instead of the usage text; plus the jsonargparse settings the extra
commands' dataclasses need (field docstrings as `--help`, bare boolean flags, `null` for a nested Optional)."""

from __future__ import annotations

import functools
import sys
import typing
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser


def config_error_sentence(message: str) -> str:
    """jsonargparse's multi-line account of a bad option as one sentence: the option, what it accepts, the value.

    `Parser key "trainer.max_epochs": Does not validate ... Subtypes: [<class 'int'>, <class 'NoneType'>] ... Given
    value: abc` becomes "`--trainer.max_epochs` accepts int or null, not 'abc'."; an unknown nested option names
    itself and its class."""
    import re

    keys = re.findall(r'Parser key "([^"]+)"', message)  # nested: model -> optim -> lr
    option = "--" + ".".join(keys) if keys else None
    unknown = re.search(r"Option '([^']+)' is not accepted", message) or re.search(
        r"Key '([^']+)' is not expected", message
    )
    klass = re.findall(r"class_path '([^']+)'", message)
    if option and unknown:
        where = f" of {klass[-1].rsplit('.', 1)[-1]}" if klass else ""
        return f"`{option}.{unknown.group(1)}` is not an option{where}; check its spelling"
    unrecognized = re.search(r"Unrecognized arguments: (.*)", message)
    if unrecognized:
        return f"Unrecognized argument {unrecognized.group(1).strip()}"
    innermost = re.search(r"Expected a <class '(?:[\w.]*\.)?(\w+)'>\. Got value: (.*)", message)
    if option and innermost:
        return f"`{option}` accepts {innermost.group(1)}, not {innermost.group(2).strip()!r}"
    literal = re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", message)  # e.g. a judge's name
    if option and literal:
        return f"`{option}` accepts one of {literal.group(1)}, not {literal.group(2).strip()!r}"
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    given = re.search(r"Given value: (.*)", message)
    if option and subtypes:
        names = re.findall(r"<class '(?:[\w.]*\.)?(\w+)'>|([\w.]+\[[^\]]*\])", subtypes.group(1))
        kinds = [("null" if a == "NoneType" else a) or b for a, b in names]
        value = f", not {given.group(1).strip()!r}" if given else ""
        return f"`{option}` accepts {' or '.join(kinds)}{value}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if not ln.startswith(("Does not validate", "Subtypes", "Errors"))), "")
    head = lines[0] if lines else message
    return f"{head} {detail}".strip().rstrip(":")


class SalsaParser(LightningArgumentParser):
    """Lightning's parser, naming the command as the user typed it in `usage:` lines (argparse would say
    `__main__.py`); jsonargparse builds the parser of `--model.help X` as another instance of this class. A bad
    option is one line — the option, what it takes, the value given — not the whole usage text (that stays under
    `--help`), exit code 2 as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prog", _prog())
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {config_error_sentence(message)}; `{prog} --help` lists every option.\n")
        sys.exit(2)


def _prog() -> str:
    """`salsa-lightning` when run as the installed script, else the README's `python -m salsa_lightning`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("salsa") else "python -m salsa_lightning"


def bare_bool_flags(parser: LightningArgumentParser, cls: type) -> None:
    """Let a boolean field be given as a bare flag (`--overwrite`), as in most CLIs, besides `--overwrite true`."""
    booleans = {name for name, hint in typing.get_type_hints(cls).items() if hint is bool}
    for action in parser._actions:
        if action.dest in booleans:
            action.nargs, action.const = "?", True


def keep_nested_nulls() -> None:
    """Let `--model.ppo.missing_eos_penalty=null` switch an Optional field nested in a spec off, as YAML can.

    jsonargparse (4.53) hands an option nested below a class (`--model.X.Y`) on to that class's parser as the text
    `f"--{key}={value}"` of a value it has already parsed, so YAML's `null` arrives there as the string 'None',
    which no Optional type accepts. We give such a value back as `null` before it is re-parsed."""
    from jsonargparse import Namespace, _typehints

    original = getattr(_typehints, "adapt_class_type", None)
    needed = (getattr(_typehints, "NestedArg", None), getattr(_typehints, "subclass_spec_as_namespace", None))
    if original is None or None in needed or getattr(original, "keeps_nested_nulls", False):
        return  # another jsonargparse layout (tests/test_cli.py says whether it still needs this) or done already

    @functools.wraps(original)
    def adapt_class_type(value, *args, **kwargs):
        value = _typehints.subclass_spec_as_namespace(value)  # what `original` does first (idempotent)
        init_args = value.get("init_args") if isinstance(value, Namespace) else None
        if isinstance(init_args, _typehints.NestedArg) and init_args.val is None:
            value["init_args"] = init_args._replace(val="null")
        return original(value, *args, **kwargs)

    adapt_class_type.keeps_nested_nulls = True
    _typehints.adapt_class_type = adapt_class_type


def enable_attribute_docstrings() -> None:
    """Make dataclass field docstrings (a string under each field) the `--help` text of their options."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse: help text without field docs
        pass
