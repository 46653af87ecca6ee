"""Encode and decode one SoftMix example as a `tf.train.Example` (kept as a pair).

Example schema (stable; the README copies this table):

| key | dtype | shape | meaning |
|---|---|---|---|
| `image/encoded` | bytes | [] | the image: PNG, or raw bytes (see `image/format`) |
| `image/format` | bytes | [] | `png` (uint8/uint16, 1, 3 or 4 channels), else `raw` |
| `image/shape` | int64 | [3] | `[H, W, C]` |
| `image/dtype` | bytes | [] | numpy dtype name of the pixels: `uint8`, `float32`... |
| `label` | float32 | [K] | soft label `(1 - lam) * y_a + lam * y_b`; K classes |
| `lam` | float32 | [] | weight of source `b` (0 for originals and unmixed) |
| `a/slide_id` | bytes | [] | slide of source `a` (the anchor tile) |
| `a/level` | int64 | [] | pyramid level of source `a` |
| `a/x`, `a/y` | int64 | [] | tile = `level[y:y+H, x:x+W]` in that level's grid |
| `a/label` | int64 | [] | class index of `a` (argmax of its soft label if any) |
| `b/...` | | | the same five keys for source `b` (`b == a`: original) |
| `seed` | int64 | [2] | stateless seed the SoftMix op used |
| `example_id` | bytes | [] | unique id: `<a key>#m<mix_index>` or `<a key>#orig` |
| `mix_index` | int64 | [] | 0..num_mixes-1, or -1 for the original |

Raw images are little-endian, row-major `[H, W, C]`:
`image.astype(image.dtype.newbyteorder("<")).tobytes()`. The class names (index ->
name) are in ``manifest.json``; K = `len(class_names)`.

PNG bytes come from `tf.io.encode_png` (libpng, zlib level 3: about 2.5x faster than
the default level 6 for 1-2% larger files on tissue tiles), which is
deterministic: the same pixels always give the same bytes, so Beam and Dask shards
match. Records are serialized with sorted keys (`deterministic=True`) for the same
reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..records import MixedExample, TileRecord

__all__ = [
    "FIELDS",
    "PNG_DTYPES",
    "PROVENANCE",
    "choose_format",
    "decode_example",
    "encode_example",
    "feature_spec",
    "parse_and_decode",
    "provenance",
]

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported inside the functions that use it: the schema's constants
# (`FIELDS`, `field_shape`) serve drivers that write manifests and never load TF.

PNG_DTYPES = ("uint8", "uint16")
PNG_CHANNELS = (1, 3, 4)
_SOURCE_FIELDS = ("slide_id", "level", "x", "y", "label")

# The schema (module docstring) as data, the one place it is defined: key -> (dtype,
# shape), "K" = the number of classes. `encode_example`, `feature_spec` (parsing),
# `output.tfds_features` and the stream's output signature are all built from it.
IMAGE_FIELDS: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "image/encoded": ("string", ()),
    "image/format": ("string", ()),
    "image/shape": ("int64", (3,)),
    "image/dtype": ("string", ()),
}
PROVENANCE: tuple[str, ...] = ("seed", "example_id", "mix_index") + tuple(
    f"{p}/{f}" for p in ("a", "b") for f in _SOURCE_FIELDS)
FIELDS: dict[str, tuple[str, tuple[int | str, ...]]] = {
    **IMAGE_FIELDS,
    "label": ("float32", ("K",)),
    "lam": ("float32", ()),
    "seed": ("int64", (2,)),
    "example_id": ("string", ()),
    "mix_index": ("int64", ()),
    **{f"{p}/{f}": ("string" if f == "slide_id" else "int64", ())
       for p in ("a", "b") for f in _SOURCE_FIELDS},
}
# Keys older shards may lack, with the value a parse gives them.
_DEFAULTS = {"example_id": "", "mix_index": -1}


def field_shape(name: str, num_classes: int) -> list[int]:
    """The shape of field `name` for K = `num_classes`."""
    return [num_classes if d == "K" else int(d) for d in FIELDS[name][1]]


def provenance(example_id: str, a: TileRecord, b: TileRecord, mix_index: int,
               seed: tuple[int, int]) -> dict[str, Any]:
    """The `PROVENANCE` fields of one example, as Python values (str, int, [int, int])."""
    out: dict[str, Any] = {"seed": [int(seed[0]), int(seed[1])], "example_id": example_id,
                           "mix_index": int(mix_index)}
    for prefix, tile in (("a", a), ("b", b)):
        out[f"{prefix}/slide_id"] = tile.key.slide_id
        out[f"{prefix}/level"] = int(tile.key.level)
        out[f"{prefix}/x"] = int(tile.key.x)
        out[f"{prefix}/y"] = int(tile.key.y)
        out[f"{prefix}/label"] = _class_index(tile)
    return out


# PNG encoding (imagecodecs/libpng): Paeth filter + zlib RLE strategy at level 1. On
# 256-px H&E tissue tiles it takes ~2.0 ms and ~77 KB, where TensorFlow's encoder
# (adaptive filters, level 3) takes ~4.2 ms and ~82 KB; PNG encoding is most of the
# mixing step's time, so this halves it. Any PNG decoder reads the result.
PNG_LEVEL = 1


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of uint8/uint16 ``[H, W, C]`` (C = 1, 3 or 4)."""
    import imagecodecs

    if image.shape[-1] == 1:
        image = image[..., 0]
    return imagecodecs.png_encode(np.ascontiguousarray(image), level=PNG_LEVEL,
                                  strategy=imagecodecs.PNG.STRATEGY.RLE,
                                  filter=imagecodecs.PNG.FILTER.PAETH)


def choose_format(dtype: np.dtype | str, num_channels: int) -> str:
    """``"png"`` when PNG can hold the pixels losslessly, else ``"raw"``.

    >>> choose_format("uint16", 1), choose_format("uint8", 7), choose_format("float32", 3)
    ('png', 'raw', 'raw')
    """
    name = np.dtype(dtype).name
    return "png" if name in PNG_DTYPES and num_channels in PNG_CHANNELS else "raw"


def _feature(dtype: str, value: Any) -> tf.train.Feature:
    import tensorflow as tf

    values = value if isinstance(value, list) else [value]
    if dtype == "string":
        encoded = [v if isinstance(v, bytes) else v.encode("utf-8") for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=encoded))
    if dtype == "int64":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _class_index(tile: TileRecord) -> int:
    if tile.soft_label is not None and len(tile.soft_label) > 0:
        return int(np.argmax(np.asarray(tile.soft_label)))
    return int(tile.label)


def encode_example(example: MixedExample, *, image_format: str | None = None) -> bytes:
    """Serialize `example` to `tf.train.Example` bytes (schema in the module docstring).

    Args:
        example: the mixed example; `image` is a numpy array [H, W, C] (rank 2 is
            read as C = 1), `label` float [K].
        image_format: None (PNG when possible, else raw), ``"png"`` or ``"raw"``.

    Returns:
        The serialized `tf.train.Example`.

    Raises:
        ValueError: bad image rank, or ``"png"`` requested for pixels PNG cannot hold.
    """
    image = np.asarray(example.image)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3:
        raise ValueError(
            "`example.image` must be rank 3 [height, width, channels]. "
            f"Received: image.shape={image.shape} for example {example.spec.example_id!r}."
        )
    auto = choose_format(image.dtype, image.shape[-1])
    fmt = auto if image_format is None else image_format
    if fmt not in ("png", "raw"):
        raise ValueError(f"`image_format` must be None, 'png' or 'raw'. Received: {fmt!r}")
    if fmt == "png" and auto != "png":
        raise ValueError(
            "PNG holds only uint8/uint16 images with 1, 3 or 4 channels. Received: "
            f"dtype={image.dtype.name}, channels={image.shape[-1]}. Use image_format='raw'."
        )
    if fmt == "png":
        encoded = encode_png(image)
    else:
        encoded = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes()
    spec = example.spec
    values: dict[str, Any] = {
        "image/encoded": encoded,
        "image/format": fmt,
        "image/shape": [int(d) for d in image.shape],
        "image/dtype": image.dtype.name,
        "label": np.asarray(example.label, dtype=np.float32).reshape(-1).tolist(),
        "lam": float(example.lam),
        **provenance(spec.example_id, spec.a, spec.b, spec.mix_index, spec.seed),
    }
    feature = {key: _feature(FIELDS[key][0], value) for key, value in values.items()}
    import tensorflow as tf

    proto = tf.train.Example(features=tf.train.Features(feature=feature))
    return proto.SerializeToString(deterministic=True)


def _decode_image(encoded: bytes, fmt: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    import tensorflow as tf

    np_dtype = np.dtype(dtype)
    if fmt == "png":
        tf_dtype = tf.uint16 if np_dtype == np.uint16 else tf.uint8
        return tf.io.decode_png(encoded, dtype=tf_dtype).numpy().reshape(shape)
    flat = np.frombuffer(encoded, dtype=np_dtype.newbyteorder("<"))
    return flat.astype(np_dtype).reshape(shape)


def decode_example(serialized: bytes) -> dict[str, Any]:
    """Parse one record into numpy values (the inverse of `encode_example`).

    Returns:
        A dict with the schema's keys plus ``"image"``: the decoded pixels, numpy
        [H, W, C] in their stored dtype. Strings are `str`, scalars numpy scalars,
        `label` float32 [K], `seed` int64 [2].
    """
    import tensorflow as tf

    proto = tf.train.Example.FromString(serialized)
    feats = proto.features.feature

    def one_bytes(key: str) -> str:
        return feats[key].bytes_list.value[0].decode("utf-8")

    def one_int(key: str) -> np.int64:
        return np.int64(feats[key].int64_list.value[0])

    shape = tuple(int(d) for d in feats["image/shape"].int64_list.value)
    fmt, dtype = one_bytes("image/format"), one_bytes("image/dtype")
    encoded = feats["image/encoded"].bytes_list.value[0]
    out: dict[str, Any] = {
        "image": _decode_image(encoded, fmt, shape, dtype),
        "image/encoded": encoded,
        "image/format": fmt,
        "image/shape": np.asarray(shape, dtype=np.int64),
        "image/dtype": dtype,
        "label": np.asarray(feats["label"].float_list.value, dtype=np.float32),
        "lam": np.float32(feats["lam"].float_list.value[0]),
        "seed": np.asarray(feats["seed"].int64_list.value, dtype=np.int64),
        "example_id": one_bytes("example_id") if "example_id" in feats else "",
        "mix_index": one_int("mix_index") if "mix_index" in feats else np.int64(-1),
    }
    for prefix in ("a", "b"):
        out[f"{prefix}/slide_id"] = one_bytes(f"{prefix}/slide_id")
        for field in _SOURCE_FIELDS[1:]:
            out[f"{prefix}/{field}"] = one_int(f"{prefix}/{field}")
    return out


def feature_spec(num_classes: int) -> dict[str, tf.io.FixedLenFeature]:
    """The `tf.io.parse_single_example` spec of the schema, for K = `num_classes`."""
    import tensorflow as tf

    return {key: tf.io.FixedLenFeature(field_shape(key, num_classes), tf.as_dtype(dtype),
                                       **({"default_value": _DEFAULTS[key]}
                                          if key in _DEFAULTS else {}))
            for key, (dtype, _) in FIELDS.items()}


def parse_and_decode(
    serialized: tf.Tensor, num_classes: int, dtype: str | np.dtype = "uint8"
) -> dict[str, tf.Tensor]:
    """Graph-mode parse of one record plus image decoding (for `tf.data.Dataset.map`).

    Args:
        serialized: scalar string tensor, one record.
        num_classes: K.
        dtype: the images' numpy dtype; static because a graph's dtypes are. Every
            record must have this `image/dtype` (checked at run time).

    Returns:
        The parsed features plus ``"image"``: `dtype` [H, W, C].
    """
    import tensorflow as tf

    np_dtype = np.dtype(dtype)
    tf_dtype = tf.as_dtype(np_dtype)
    features = tf.io.parse_single_example(serialized, feature_spec(num_classes))
    shape = features["image/shape"]
    encoded = features["image/encoded"]
    check = tf.debugging.assert_equal(
        features["image/dtype"], tf.constant(np_dtype.name),
        message=f"record image/dtype differs from the dataset's dtype {np_dtype.name}",
    )

    def raw() -> tf.Tensor:
        return tf.reshape(tf.io.decode_raw(encoded, tf_dtype, little_endian=True), shape)

    with tf.control_dependencies([check]):
        if np_dtype.name in PNG_DTYPES:
            def png() -> tf.Tensor:
                return tf.reshape(tf.io.decode_png(encoded, dtype=tf_dtype), shape)

            image = tf.cond(tf.equal(features["image/format"], "png"), png, raw)
        else:
            image = raw()
    features["image"] = image
    return features
