"""Data sets, image reading and the synthetic generator (transforms and samplers live beside them)."""

from passreid.data.datasets import (
    IMAGE_EXTENSIONS,
    CSVDataset,
    CUHK03NP,
    DukeMTMC,
    ImageFolderDataset,
    ImageRecord,
    Market1501,
    MSMT17,
    ReIDDataset,
    SyntheticMarket,
    build_dataset,
    dataset_fingerprint,
    list_datasets,
    relabel,
)
from passreid.data.images import ImageDataset, read_image
from passreid.data.synthetic import DOMAINS, generate_synthetic
from passreid.errors import DatasetError

__all__ = [
    "CSVDataset",
    "CUHK03NP",
    "DOMAINS",
    "DatasetError",
    "DukeMTMC",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageRecord",
    "MSMT17",
    "Market1501",
    "ReIDDataset",
    "SyntheticMarket",
    "build_dataset",
    "dataset_fingerprint",
    "generate_synthetic",
    "list_datasets",
    "read_image",
    "relabel",
]
