import json

import pytest
import torch
import torch.nn.functional as F

from compatkit.errors import UnknownNameError
from compatkit.models import ArcFaceClassifier, EmbeddingModel, ModelOutput, create_model

SMALL = {"backbone": "resnet10_cifar", "width": 0.125, "embed_dim": 8}
X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_forward_returns_model_output_with_normalised_embedding():
    torch.manual_seed(0)
    model = create_model(**SMALL, num_classes=5)
    out = model(X)
    assert isinstance(out, ModelOutput)
    assert out.embedding.shape == (3, 8) and out.logits.shape == (3, 5)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(3))
    model.eval()
    torch.testing.assert_close(model.embed(X), model(X).embedding)
    assert model.embed_dim == 8 and model.num_classes == 5


def test_no_classifier_gives_none_logits_and_unnormalised_option():
    model = create_model(**SMALL, normalize=False).eval()
    out = model(X)
    assert out.logits is None and model.classifier is None
    torch.testing.assert_close(out.embedding, model.raw_embedding(X))
    assert not torch.allclose(out.embedding.norm(dim=1), torch.ones(3))


def test_linear_classifier_receives_the_unnormalised_embedding():
    model = create_model(**SMALL, num_classes=4).eval()
    raw = model.raw_embedding(X)
    torch.testing.assert_close(model(X).logits, raw @ model.classifier.weight.T)
    assert not torch.allclose(raw, F.normalize(raw, dim=1))


def test_margin_classifier_uses_labels():
    model = create_model(**SMALL, num_classes=4, classifier="arcface",
                         classifier_kwargs={"scale": 16.0, "margin": 0.5}).eval()
    assert isinstance(model.classifier, ArcFaceClassifier)
    assert model.classifier.scale == 16.0 and model.classifier.margin == 0.5
    labels = torch.tensor([0, 1, 2])
    plain, margin = model(X).logits, model(X, labels).logits
    changed = ~torch.isclose(plain, margin)
    assert changed.sum(dim=1).tolist() == [1, 1, 1]
    assert changed[torch.arange(3), labels].all()


def test_spec_round_trip_gives_identical_outputs():
    torch.manual_seed(1)
    model = create_model(**SMALL, num_classes=5, classifier="cosine", bn_neck=True,
                         pooling="gem", classifier_kwargs={"scale": 10.0})
    model(X)  # move BN running stats away from their initial values
    model.eval()
    spec = model.spec
    assert json.loads(json.dumps(spec)) == spec  # plain, JSON-able
    assert spec["backbone"] == "resnet10_cifar" and spec["classifier_kwargs"] == {"scale": 10.0}
    torch.manual_seed(2)
    rebuilt = create_model(**spec)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    a, b = model(X), rebuilt(X)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits)


def test_spec_is_a_copy():
    model = create_model(**SMALL)
    model.spec["embed_dim"] = 999
    model.spec["classifier_kwargs"]["scale"] = 1.0
    assert model.spec["embed_dim"] == 8 and model.spec["classifier_kwargs"] == {}


def test_create_model_errors():
    with pytest.raises(UnknownNameError, match=r"did you mean.*resnet18_cifar"):
        create_model(backbone="resnet18_cifarr")
    with pytest.raises(UnknownNameError, match=r"unknown classifier 'cosin'.*cosine"):
        create_model(**SMALL, num_classes=3, classifier="cosin")
    with pytest.raises(ValueError, match="num_classes is None"):
        create_model(**SMALL, classifier_kwargs={"scale": 3.0})
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        create_model(backbone="resnet10_cifar", embed_dim=0)
    with pytest.raises(ValueError, match="num_classes must be >= 1 or None, got 0"):
        create_model(**SMALL, num_classes=0)


def test_mismatched_parts_raise():
    model = create_model(**SMALL, num_classes=3)
    with pytest.raises(ValueError, match="backbone gives 64 features but the head expects 32"):
        EmbeddingModel(model.backbone, type(model.head)(32, 8))
    with pytest.raises(ValueError, match="classifier expects embed_dim 4, head gives 8"):
        EmbeddingModel(model.backbone, model.head, ArcFaceClassifier(4, 3))
    assert EmbeddingModel(model.backbone, model.head).spec is None
