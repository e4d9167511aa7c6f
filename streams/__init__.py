"""Everything that talks to Kafka: the worker, its batched event stage, clients, topics and replay."""
