"""One error type whose message is a single line the CLI prints as is."""


class PipelineError(Exception):
    """A user-facing failure: bad input, bad config, failed validation. One line, names the culprit."""


class ConfigError(PipelineError):
    """params.yaml (or an override) is invalid."""


class DataError(PipelineError):
    """The data set on disk or at the source is unusable."""


class TransientError(PipelineError):
    """I/O that may succeed on a later try: a download, the tracking server, the model registry."""


def registry_says_missing(exc: BaseException) -> bool:
    """Whether the MLflow registry itself answered that a model, version or alias does not exist: the error code
    RESOURCE_DOES_NOT_EXIST, or, for an alias, INVALID_PARAMETER_VALUE "Registered model alias X not found". Never
    a proxy's bare 404 (ENDPOINT_NOT_FOUND): mid-rollout that is no answer about the registry's contents."""
    code, text = getattr(exc, "error_code", ""), str(exc).lower()
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text
    )


# Exit statuses of `pneumo`, which DVC passes on: the Prefect flow reads them to tell what to retry.
EXIT_VALIDATION = 1  # the data failed validation
EXIT_ERROR = 2  # any other user-facing error
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: I/O that may succeed on a later try
