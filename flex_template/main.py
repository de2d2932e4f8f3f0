"""The Dataflow Flex Template's launcher program (flex_template/Dockerfile points
FLEX_TEMPLATE_PYTHON_PY_FILE here).

Dataflow's Python launcher runs this file with every template parameter as one ``--name=value``
flag: the audit's own parameters under the ``run`` options' names (``image_column``, as in
flex_template/metadata.json) and Dataflow's pipeline options (``--project``, ``--region``,
``--temp_location``, ``--sdk_container_image``, ...). ``to_cli_args`` turns them into the
``xai-audit run`` command line, so the template accepts exactly what the CLI accepts and refuses
what it refuses, with the same one-paragraph messages and exit codes:

* ``--image_column=x`` becomes ``--image-column x``;
* an on/off option without a value (``--overwrite``) is given as ``true`` or ``false``;
* a repeatable option (``--slice-bins``) takes several values separated by ``;``.
"""
import argparse
import sys
from typing import Dict, List, Optional, Sequence

from beam_pipeline import cli

REPEAT_SEPARATOR = ";"


def run_options() -> Dict[str, argparse.Action]:
    """The ``xai-audit run`` options by name (argparse dest), read from the CLI's own parser."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices["run"]._actions
            if action.dest != "help"}


def _flag(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def to_cli_args(argv: Sequence[str]) -> List[str]:
    """Template flags → ``xai-audit run`` arguments; Dataflow's own flags pass unchanged."""
    options = run_options()
    args: List[str] = []
    for arg in argv:
        name, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        action = options.get(name)
        if action is None or not has_value:
            args.append(arg)  # a pipeline option, or already in the CLI's own form
        elif isinstance(action, argparse._StoreTrueAction):
            if value.strip().lower() not in ("true", "false"):
                args.append(f"{_flag(action)}={value}")  # argparse refuses it: exit 2
            elif value.strip().lower() == "true":
                args.append(_flag(action))
        elif isinstance(action, argparse._AppendAction):
            for item in value.split(REPEAT_SEPARATOR):
                args.extend([_flag(action), item.strip()])
        else:
            args.extend([_flag(action), value])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.main(["run", *to_cli_args(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
