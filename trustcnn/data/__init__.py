"""trustcnn datamodules. Every one yields ``(image, label, mask)`` samples (see ``common``)."""

from trustcnn.data.cats_dogs import CatsDogsDataModule
from trustcnn.data.common import (
    BaseDataModule,
    DatasetLayoutError,
    ImageListDataset,
    build_transforms,
    denormalize,
    load_rgb,
    stratified_split,
    stratified_subsample,
)
from trustcnn.data.decoy_digits import DecoyDigitsDataModule
from trustcnn.data.imagenet_subset import ImageNetSubsetDataModule, load_wnids
from trustcnn.data.oxford_pet import OxfordPetDataModule

__all__ = [
    "BaseDataModule",
    "CatsDogsDataModule",
    "DatasetLayoutError",
    "DecoyDigitsDataModule",
    "ImageListDataset",
    "ImageNetSubsetDataModule",
    "OxfordPetDataModule",
    "build_transforms",
    "denormalize",
    "load_rgb",
    "load_wnids",
    "stratified_split",
    "stratified_subsample",
]
