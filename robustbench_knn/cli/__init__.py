"""``robustbench-knn``'s command line: ``main`` parses the arguments and runs one command.

Bad input gives one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Sequence

from ..config import UsageError
from .commands_audit import cmd_active_test, cmd_audit, cmd_certify, cmd_gate
from .commands_report import cmd_attacks, cmd_bench, cmd_leaderboard, cmd_sandwich, cmd_search, cmd_table, cmd_toolkits
from .commands_run import cmd_evaluate, cmd_export, cmd_merge, cmd_train
from .parser import TEST_SET_SIZE, _model_config, build_parser, check_writable_file, parse_eps

__all__ = ["COMMANDS", "DISTRIBUTED", "TEST_SET_SIZE", "build_parser", "check_writable_file", "main", "parse_eps",
           "_model_config"]


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "attacks": cmd_attacks, "toolkits": cmd_toolkits,
            "search": cmd_search, "export": cmd_export, "merge": cmd_merge,
            "bench": cmd_bench, "table": cmd_table, "gate": cmd_gate, "audit": cmd_audit,
            "leaderboard": cmd_leaderboard, "active-test": cmd_active_test, "certify": cmd_certify,
            "sandwich": cmd_sandwich}


DISTRIBUTED = ("evaluate", "audit", "toolkits")  # the commands torchrun can split


def main(argv: Sequence[str] | None = None) -> int:
    from ..evaluation import distributed
    from ..evaluation.evaluate import COMMAND

    where = ""
    try:
        args = build_parser().parse_args(argv)
        COMMAND[:] = ["robustbench-knn", *(sys.argv[1:] if argv is None else argv)]
        if not distributed.launched_by_torchrun():
            rc = COMMANDS[args.command](args)
        else:
            if args.command not in DISTRIBUTED:
                raise UsageError(f"torchrun splits {', '.join(DISTRIBUTED)}; run {args.command!r} as one process")
            part = distributed.init_group()
            where = f" (rank {part.rank} of {part.world})"
            try:
                with distributed.use(part), contextlib.ExitStack() as stack:
                    if not part.writer:  # rank 0 prints, draws progress and writes what every rank holds
                        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                        args.quiet = True
                    rc = COMMANDS[args.command](args)
            finally:
                distributed.close_group()
    except UsageError as e:
        print(f"robustbench-knn: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustbench-knn: interrupted (finished work is cached; run again to resume)", file=sys.stderr)
        return 130
    return rc or 0
