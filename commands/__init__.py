"""The composition root: the `recsys` command line (`cli.main`) and the demo; imports every layer."""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {"main": "commands.cli"})
