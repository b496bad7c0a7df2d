"""Entry point of `python -m utils.toy`."""
from utils.cli import run
from utils.toy.cli import main, parse_args

run(main, parse_args)
