"""The ``hellora`` command line: profile, select, train, eval, report, merge, export, ablate.

Laid out like TRL's ``trl`` CLI: :mod:`hellora_trl.cli.main` is the router, :mod:`hellora_trl.cli.commands` holds
one module per command, :mod:`hellora_trl.cli.arguments` the shared argument dataclasses and
:mod:`hellora_trl.cli.loading` the shared model / data helpers. ``main(argv)`` runs a command in-process and
returns its exit status (the console script ``hellora = "hellora_trl.cli:main"``).
"""

from .main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
