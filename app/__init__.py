"""Entry points: the `ftd` command line (cli.py). The top layer: it uses the core (`ftd/`), the
stages (`tasks/`) and the flows (`flows/`); nothing imports it."""
