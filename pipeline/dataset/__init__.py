"""The output dataset: the example schema, TFRecord shards, and the tf.data reader."""
