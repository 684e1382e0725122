"""Package logger: a NullHandler, never basicConfig at import."""

import logging

logger = logging.getLogger("scsuperweight")
logger.addHandler(logging.NullHandler())
