"""Where the steps run: Apache Beam, Dask distributed, and the tf.data stream."""
