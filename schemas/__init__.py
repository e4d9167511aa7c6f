"""Avro schemas: the contract between web backends, workers and recommendation consumers."""
