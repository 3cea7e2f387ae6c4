"""The help layout every `fl-dp` subcommand shares."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstrings' layout and shows every option's default."""
