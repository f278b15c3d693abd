"""The ``attnkit`` command line. Each module here defining ``register(subparsers)`` adds a subcommand."""
