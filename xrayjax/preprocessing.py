"""Input preprocessing of each backbone, equal to ``keras.applications.<module>.preprocess_input``.

The ImageNet weights of a backbone expect the input Keras trained them on, so the mode goes
with the backbone (``create_backbone(arch).preprocessing``):

- ``caffe`` (VGG16, VGG19, ResNet50): RGB -> BGR, then minus the ImageNet channel means;
- ``torch`` (DenseNet121): x / 255, then minus the ImageNet channel means and divided by their
  standard deviations, in RGB order;
- ``rescale``: x / 255 (what ``ImageDataGenerator(rescale=1./255)`` fed a Keras model);
- ``none``: the pixels as they are, as float32.

The last two exist for Keras models imported whole (``weights/port.py --keras-model``).
"""

import jax
import jax.numpy as jnp

# ImageNet channel statistics, as in keras.applications.imagenet_utils.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)  # caffe, in [0, 255]
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # torch, in [0, 1]
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
MODES: tuple[str, ...] = ("caffe", "torch", "rescale", "none")
# The mode of each backbone's published weights (keras.applications: vgg16, vgg19 and resnet
# use "caffe", densenet "torch").
ARCH_PREPROCESSING: dict[str, str] = {
    "vgg16": "caffe", "vgg19": "caffe", "resnet50": "caffe", "densenet121": "torch",
}


def preprocess_input(x: jax.typing.ArrayLike, arch: str = "vgg16", *, mode: str | None = None) -> jax.Array:
    """Map RGB images in [0, 255] (uint8 or float, NHWC, any leading dims) to the float32 input
    of backbone ``arch`` (``mode``, when given, overrides the arch's: one of :data:`MODES`).
    Gray images (1 channel) are broadcast to RGB first, so gray batches cross to the device at
    a third of the bytes.

    Pure jnp, so it works inside ``jax.jit`` (preprocess on device, next to the model).
    """
    if mode is None:
        if arch not in ARCH_PREPROCESSING:
            raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCH_PREPROCESSING)}")
        mode = ARCH_PREPROCESSING[arch]
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; valid modes: {', '.join(MODES)}")
    x = jnp.asarray(x)
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:-1], 3))
    if x.shape[-1] != 3:
        raise ValueError(
            f"preprocess_input expects RGB (3 channels last, NHWC) or gray (1) images, got shape {x.shape}"
        )
    x = x.astype(jnp.float32)
    if mode == "none":
        return x
    if mode == "rescale":
        return x / 255.0
    if mode == "caffe":
        return x[..., ::-1] - jnp.asarray(IMAGENET_MEAN_BGR, jnp.float32)
    # Keras' order of operations, for equal rounding: divide, subtract, divide.
    return (x / 255.0 - jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)) / jnp.asarray(IMAGENET_STD_RGB, jnp.float32)
