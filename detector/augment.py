"""Stain and focus augmentation for detector training: random HED stain jitter and defocus blur.

Each training image's optical density is split into three stain channels with Ruifrok and Johnston's
colour-deconvolution matrix ("Quantification of histochemical staining by color deconvolution", Anal Quant Cytol
Histol 2001), each channel is scaled by ``1 + U(-sigma, sigma)`` and shifted by ``U(-sigma, sigma)``, and the image
is put back together (Tellez et al., "Quantifying the effects of data augmentation and stain color normalization
in convolutional neural networks for computational pathology", Med Image Anal 2019: "HED" augmentation, light at
sigma 0.05, strong at 0.2). A detector trained this way sees each lab's fields in many stain strengths and hues,
so a lab whose Wright-Giemsa stain is bluer or paler than every training lab's is less foreign to it.
:class:`Defocus` blurs a share of the training images (a Gaussian of random width), as fields from a microscope
focused a little off the cells' plane look.
"""

from __future__ import annotations

import numpy as np

# Rows: the optical density of haematoxylin, eosin and DAB per RGB channel (Ruifrok & Johnston 2001, as scikit-image).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


def hed_jitter(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``image`` (uint8, 3 channels, RGB or BGR as ``alpha``/``beta`` are ordered for HED) with each stain channel
    ``c`` scaled by ``alpha[c]`` and shifted by ``beta[c]`` in optical density. ``alpha = 1, beta = 0`` gives the
    image back (to within one grey level)."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    hed = hed * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    rgb = np.exp(-(hed @ RGB_FROM_HED)) * 256.0 - 1.0
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(image.shape)


class StainJitter:
    """An ultralytics training transform: HED jitter of ``labels['img']`` (BGR, as ultralytics loads it) with
    probability ``p``. Boxes are untouched."""

    def __init__(self, sigma: float, p: float = 1.0):
        self.sigma, self.p = float(sigma), float(p)

    def __call__(self, labels: dict) -> dict:
        # numpy's global generator, which ultralytics seeds per data-loader worker (like its own transforms)
        if self.sigma > 0 and np.random.random() < self.p:
            alpha = 1.0 + np.random.uniform(-self.sigma, self.sigma, 3)
            beta = np.random.uniform(-self.sigma, self.sigma, 3)
            rgb = np.ascontiguousarray(labels["img"][..., ::-1])
            labels["img"] = np.ascontiguousarray(hed_jitter(rgb, alpha, beta)[..., ::-1])
        return labels


class Defocus:
    """An ultralytics training transform: with probability ``p``, a Gaussian blur of ``labels['img']`` whose SD is
    drawn from ``U(low, high)`` pixels."""

    def __init__(self, p: float, low: float = 0.5, high: float = 2.0):
        self.p, self.low, self.high = float(p), float(low), float(high)

    def __call__(self, labels: dict) -> dict:
        if self.p > 0 and np.random.random() < self.p:
            import cv2

            labels["img"] = cv2.GaussianBlur(labels["img"], (0, 0), float(np.random.uniform(self.low, self.high)))
        return labels


def augmenting_trainer(stain_sigma: float, blur_p: float):
    """An ultralytics ``DetectionTrainer`` class whose training set adds :class:`StainJitter` (``stain_sigma``) and
    :class:`Defocus` (``blur_p``) before the final formatting step, and keeps them when mosaic is closed for the last
    epochs."""
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.models.yolo.detect import DetectionTrainer

    class AugmentedDataset(YOLODataset):
        def build_transforms(self, hyp):
            transforms = super().build_transforms(hyp)
            if self.augment:
                for extra in (StainJitter(stain_sigma), Defocus(blur_p)):
                    transforms.insert(len(transforms.transforms) - 1, extra)
            return transforms

    class AugmentingTrainer(DetectionTrainer):
        def build_dataset(self, img_path, mode="train", batch=None):
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train":
                dataset.__class__ = AugmentedDataset
                dataset.transforms = dataset.build_transforms(hyp=self.args)
            return dataset

    return AugmentingTrainer
