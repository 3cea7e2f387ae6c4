"""Keep Flower's log lines single and at their own level.

dp-accounting logs through absl, whose first message calls ``logging.basicConfig()``; Opacus
calls it on import. That gives the root logger a stderr handler with no level, and every
record of Flower's ``flwr`` logger (which propagates) is printed a second time, DEBUG lines
included ("INFO:flwr:..." next to Flower's own "INFO : ..."). A NullHandler on the root logger
makes ``basicConfig`` a no-op; Flower keeps its own console handler.
"""

import logging


def keep_root_logger_quiet() -> None:
    if not logging.root.handlers:
        logging.root.addHandler(logging.NullHandler())
