"""One module per `edgedi` subcommand (see edgedi.agent.cli)."""
