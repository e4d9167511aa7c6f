"""Everything that learns or scores: data loading, the sequence encoder, training, evaluation, text embedding,
the item index, the model registry and the serving API (``Recommender``)."""
