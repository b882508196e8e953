"""Input preprocessing identical to ``keras.applications.vgg16.preprocess_input``.

VGG16, VGG19 and ResNet50 all use Keras' "caffe" mode: RGB -> BGR, then subtract the
ImageNet channel means, no scaling. The ported ImageNet weights expect exactly this input.
"""

import jax
import jax.numpy as jnp

# ImageNet channel means in BGR order, as in keras.applications.imagenet_utils.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_input(x: jax.typing.ArrayLike) -> jax.Array:
    """Map RGB images in [0, 255] (uint8 or float, NHWC, any leading dims) to caffe-mode float32.

    Pure jnp, so it works inside ``jax.jit`` (preprocess on device, next to the model).
    """
    x = jnp.asarray(x)
    if x.shape[-1] != 3:
        raise ValueError(
            f"preprocess_input expects RGB images with 3 channels last (NHWC), got shape {x.shape}"
        )
    bgr = x.astype(jnp.float32)[..., ::-1]
    return bgr - jnp.asarray(IMAGENET_MEAN_BGR, dtype=jnp.float32)
