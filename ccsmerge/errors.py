class MergeError(ValueError):
    """Bad input to a merge: the message names the tensor (and model) at fault.

    Raised before anything is returned, so no partial merge escapes."""


class MergeInterrupted(KeyboardInterrupt):
    """A merge stopped by Ctrl-C (SIGINT): the message says where it stopped
    and where its finished shards are kept for `resume`."""
