"""One module per ``hellora`` command, each with ``run(argv) -> int``; the router imports them lazily."""
