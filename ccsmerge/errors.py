class MergeError(ValueError):
    """Bad input to a merge: the message names the tensor (and model) at fault.

    Raised before anything is returned, so no partial merge escapes."""
