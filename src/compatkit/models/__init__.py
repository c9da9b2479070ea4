"""Backbones, embedding and classifier heads, the embedding model, transformations, side-info.

Importing this package registers every backbone, classifier head and transformation
architecture.
"""

from compatkit.models import resnet as resnet  # registers the ResNet backbones
from compatkit.models.adapter_maps import AffineMap, ResidualTransformation
from compatkit.models.backbones import (
    BACKBONES,
    TimmBackbone,
    create_backbone,
    list_backbones,
    register_backbone,
)
from compatkit.models.heads import (
    CLASSIFIERS,
    ArcFaceClassifier,
    ClassifierHead,
    CosFaceClassifier,
    CosineClassifier,
    EmbeddingHead,
    LinearClassifier,
    create_classifier,
    register_classifier,
)
from compatkit.models.model import EmbeddingModel, FrozenModel, ModelOutput, create_model
from compatkit.models.pooling import GeM, create_pooling
from compatkit.models.resnet import BasicBlock, Bottleneck, ResNet
from compatkit.models.side_info import SideInfoModel, create_side_info_model
from compatkit.models.transformation import (
    TRANSFORMATIONS,
    Transformation,
    TransformOutput,
    create_transformation,
)

__all__ = [
    "BACKBONES",
    "CLASSIFIERS",
    "TRANSFORMATIONS",
    "AffineMap",
    "ArcFaceClassifier",
    "BasicBlock",
    "Bottleneck",
    "ClassifierHead",
    "CosFaceClassifier",
    "CosineClassifier",
    "EmbeddingHead",
    "EmbeddingModel",
    "FrozenModel",
    "GeM",
    "LinearClassifier",
    "ModelOutput",
    "ResNet",
    "ResidualTransformation",
    "SideInfoModel",
    "TimmBackbone",
    "TransformOutput",
    "Transformation",
    "create_backbone",
    "create_classifier",
    "create_model",
    "create_pooling",
    "create_side_info_model",
    "create_transformation",
    "list_backbones",
    "register_backbone",
    "register_classifier",
]
