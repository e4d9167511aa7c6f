"""streamrec: streaming, event-driven recommendations on Kafka."""

__version__ = "0.1.0"
