"""Exception types raised on bad input; each message names the problem and the fix."""


class SSWError(Exception):
    """Base class for errors the plugin raises about user input."""


class CheckpointError(SSWError, ValueError):
    """A model directory or checkpoint file cannot be read as the format it claims to be."""


class DataError(SSWError, ValueError):
    """An AnnData or data file does not fit what the step needs."""


class HookError(SSWError, RuntimeError):
    """Instrumentation did not behave as requested (unknown site, a hook that never fired)."""


class OptionError(SSWError, ValueError):
    """An option (a number, a device, a case/control level) holds a value the run cannot use."""


class OutputError(SSWError, OSError):
    """An output path cannot be written as asked (a file where a directory is needed, no permission, ...)."""


class RunDirError(SSWError, ValueError):
    """An output directory already holds another run's files (pass --overwrite to replace them)."""


class MixedRunError(RunDirError):
    """Tables or records that come from different runs (run id, data hash or model hash differ) were combined."""


class SmallDataWarning(UserWarning):
    """A metric met a group too small for it: a neighbour count was lowered or the value is NaN; the message says
    which and why (prune records it in the ``note`` column of collapse.tsv)."""
