"""Reading inputs: slides (OME-Zarr through Zarr), the counting store, the slide manifest."""
