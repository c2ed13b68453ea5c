class MergeError(ValueError):
    """Bad input to a merge: the message names the tensor (and model) at fault.

    Raised before anything is returned, so no partial merge escapes."""


class MergeInterrupted(KeyboardInterrupt):
    """A merge stopped by Ctrl-C (SIGINT) or SIGTERM: the message says where it
    stopped and where its finished shards are kept for `resume`."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before a kill), raised in the main
    thread by the command line's handler so that a merge stops as it does on
    Ctrl-C: the shard being written removed, the finished ones kept."""

    def __init__(self, message: str = "terminated by SIGTERM"):
        super().__init__(message)
