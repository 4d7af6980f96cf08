"""Error types a user sees. Each message says what was wrong, where, and what to do."""


class VitpipeError(Exception):
    """Base of every expected, user-fixable failure; the CLI prints it without a traceback."""


class DataError(VitpipeError):
    """Bad or unreachable data: a corrupt shard or image, a missing bucket, a bad manifest."""


class CheckpointError(VitpipeError):
    """A checkpoint that cannot be used: missing, from another architecture, incomplete."""


class TrackingError(VitpipeError):
    """MLflow unreachable or a run/model/alias that does not exist."""


class TrainingError(VitpipeError):
    """Training cannot proceed: a peer rank died, a launch failed, a preflight timed out."""
