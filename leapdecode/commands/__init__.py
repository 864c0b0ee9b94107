"""The `leap generate` and `leap chat` subcommands and their shared options."""
