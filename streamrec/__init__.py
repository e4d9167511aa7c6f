"""streamrec: streaming, event-driven recommendations on Kafka."""

from streamrec import native

__version__ = "0.1.0"

native.guard()  # compiled hot-path modules only while they match their sources (streamrec/native.py)
