"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class MergeError(Exception):
    """A user-facing problem with the config, an input model or the output folder.

    The message names the model, file, tensor or key involved and the offending value.
    """
