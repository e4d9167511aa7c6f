"""The operator's view of a running deployment: consumer lag, and `streamrec status`."""
