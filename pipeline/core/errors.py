"""One error type whose message is a single line the CLI prints as is."""


class PipelineError(Exception):
    """A user-facing failure: bad input, bad config, failed validation. One line, names the culprit."""


class ConfigError(PipelineError):
    """params.yaml (or an override) is invalid."""


class DataError(PipelineError):
    """The data set on disk or at the source is unusable."""


class TransientError(PipelineError):
    """I/O that may succeed on a later try: a download, the tracking server, the model registry."""
