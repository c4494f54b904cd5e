"""trustcnn datamodules. Every one yields ``(image, label, mask)`` samples (see ``base``)."""

from trustcnn.data.base import BaseDataModule, DatasetLayoutError
from trustcnn.data.cats_dogs import CatsDogsDataModule
from trustcnn.data.decoy_digits import DecoyDigitsDataModule
from trustcnn.data.imagenet_subset import ImageNetSubsetDataModule, load_wnids
from trustcnn.data.images import ImageListDataset, load_rgb
from trustcnn.data.oxford_pet import OxfordPetDataModule
from trustcnn.data.splits import stratified_split, stratified_subsample
from trustcnn.data.transforms import build_transforms, denormalize

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
