"""One module per `imagegpt` subcommand; see imagegpt.cli."""
