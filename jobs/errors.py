"""The one error of the job commands, below every module that raises it."""


class JobError(Exception):
    """A job operation that cannot go on; the message says why and what to do."""
