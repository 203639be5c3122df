"""The subcommands of the `malloc` command line, one module each (see malloc.cli)."""
