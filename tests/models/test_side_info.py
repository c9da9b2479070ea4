import torch

from compatkit.models import SideInfoModel, create_side_info_model

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_projection_is_normalised_and_features_are_stored_vector():
    torch.manual_seed(0)
    model = SideInfoModel("resnet10_cifar", width=0.125, side_dim=12, proj_dim=6, proj_hidden=10)
    z = model(X)
    assert z.shape == (4, 6)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    model.eval()
    feats = model.features(X)
    assert feats.shape == (4, 12) and model.embed_dim == 12
    torch.testing.assert_close(model.embed(X), feats)
    assert not torch.allclose(feats.norm(dim=1), torch.ones(4))
    z.sum().backward()
    assert model.backbone.conv1.weight.grad is not None


def test_side_dim_none_stores_the_backbone_feature():
    model = SideInfoModel("resnet10_cifar", width=0.125, side_dim=None).eval()
    assert model.side_dim == model.backbone.num_features == 64
    torch.testing.assert_close(model.features(X), model.backbone.forward_features(X))


def test_spec_round_trip():
    model = SideInfoModel("resnet10_cifar", width=0.125, side_dim=8, in_chans=3, pooling="gem")
    model.eval()
    rebuilt = create_side_info_model(**model.spec)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert torch.equal(model(X), rebuilt(X)) and torch.equal(model.features(X), rebuilt.features(X))
