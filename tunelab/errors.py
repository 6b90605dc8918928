"""Errors a user can act on. The CLI prints them as one clear message, without a traceback."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (libraries' loading errors put their hints on lines of
    their own), or its type's name when it has no message."""
    return " ".join(str(error).split()) or type(error).__name__


class TunelabError(Exception):
    """A problem with the user's input (config, data, model path), explained in the message."""


class ConfigError(TunelabError):
    """A bad config: unknown key, wrong type or bad value. The message names the key and the file."""


class DataError(TunelabError):
    """A bad data record. The message names the file, the record (line) number and the field."""

    def __init__(self, source: str, record: int | None, field: str | None, problem: str):
        self.source, self.record, self.field, self.problem = source, record, field, problem
        where = source
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


class Preempted(Exception):  # noqa: N818 (it is a way to stop, not a failure)
    """The run was asked to stop (SIGTERM, SIGUSR1, a first Ctrl-C) and wrote a checkpoint at the end
    of a step; `tunelab train CONFIG --resume` continues exactly there. The CLI exits with
    `EXIT_STATUS`."""

    EXIT_STATUS = 75  # EX_TEMPFAIL: try again (resume) later

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
