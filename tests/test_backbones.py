import numpy as np
import pytest
import torch

from histoweak.models.backbones import _efficientnet_lite0_file, create_backbone


def test_efficientnet_lite0_imagenet_weights_are_the_packaged_tensors():
    model = create_backbone("tf_efficientnet_lite0", weights="imagenet", num_classes=1000)
    assert model.weights_source == "imagenet:tf_efficientnet_lite0"
    src = torch.load(_efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    assert torch.equal(dst["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(dst["classifier.weight"], src["_fc.weight"])
    assert torch.equal(dst["conv_head.weight"], src["_conv_head.weight"])
    assert torch.equal(dst["bn2.running_var"], src["_bn1.running_var"])


@pytest.mark.parametrize("image,classes", [("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968})])
def test_imagenet_weights_recognise_real_photos(image, classes):
    """scikit-image's cat and coffee photos land in ImageNet's cat (281-285) and espresso/cup (967-968) classes."""
    import skimage.data
    from skimage.transform import resize

    model = create_backbone("tf_efficientnet_lite0", weights="imagenet", num_classes=1000).eval()
    img = resize(getattr(skimage.data, image)(), (224, 224), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy((img - 0.5) / 0.5).permute(2, 0, 1)[None]  # tf_efficientnet_lite0: mean = std = 0.5
    with torch.no_grad():
        top = int(model(x).argmax())
    assert top in classes


def test_features_only_carries_the_weights_and_feature_info():
    feat = create_backbone("tf_efficientnet_lite0", weights="imagenet", features_only=True)
    full = create_backbone("tf_efficientnet_lite0", weights="imagenet")
    assert torch.equal(feat.state_dict()["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
    outs = feat(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == feat.feature_info.channels()
    assert [64 // o.shape[-1] for o in outs] == feat.feature_info.reduction()


def test_local_weights_path_and_errors(tmp_path):
    with pytest.warns(UserWarning):
        m = create_backbone("resnet18", weights=None)
    torch.save(m.state_dict(), tmp_path / "r18.pt")
    m2 = create_backbone("resnet18", weights=tmp_path / "r18.pt")
    assert m2.weights_source == str(tmp_path / "r18.pt")
    assert torch.equal(m2.state_dict()["conv1.weight"], m.state_dict()["conv1.weight"])
    with pytest.raises(ValueError, match="no offline ImageNet weights for 'resnet18'"):
        create_backbone("resnet18", weights="imagenet")
    with pytest.raises(ValueError, match="weights do not fit"):
        create_backbone("resnet34", weights=tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        create_backbone("nope", weights=None)


def test_features_only_swin_gets_the_weights_of_its_renamed_stages(tmp_path):
    """timm's feature wrapper renames Swin's stages (layers.0 -> layers_0): a local state dict still lands in every
    tensor of the feature extractor (PSCL's default encoder)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = create_backbone("swin_tiny_patch4_window7_224", weights=None)
    torch.save(full.state_dict(), tmp_path / "swin.pt")
    feat = create_backbone("swin_tiny_patch4_window7_224", weights=tmp_path / "swin.pt", features_only=True)
    ref = full.state_dict()
    got = feat.state_dict()
    assert torch.equal(got["layers_3.blocks.1.mlp.fc2.weight"], ref["layers.3.blocks.1.mlp.fc2.weight"])
    assert all(torch.equal(v, ref[k.replace("layers_", "layers.", 1)]) for k, v in got.items())
