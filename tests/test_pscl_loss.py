import math

import pytest
import torch
from pytorch_metric_learning.losses import SupConLoss  # the reference; a declared test dependency

from histoweak.methods.pscl_loss import kept_pixel_labels, pscl_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def random_case(seed, n=2, d=8, h=5, w=6, k=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, h, w, generator=g, dtype=dtype, requires_grad=True)
    cams = torch.rand(n, k, h, w, generator=g, dtype=dtype)
    return features, cams


def kept_embeddings(features, cams, tau):
    labels, keep = kept_pixel_labels(cams, tau)
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])[keep], labels[keep]


def hand_made():
    """One image, five pixels in a row; K = 2; features in 2-D."""
    cams = torch.tensor([[0.9, 0.2, 0.3, 0.7, 0.25],  # class 0
                         [0.1, 0.1, 0.6, 0.2, 0.10]]).reshape(1, 2, 1, 5)  # class 1
    features = torch.tensor([[1.0, 5.0, 0.0, 2.0, -3.0],
                             [0.0, 5.0, 3.0, 0.0, 7.0]]).reshape(1, 2, 1, 5).requires_grad_()
    return features, cams


def test_kept_labels_hand_made():
    _, cams = hand_made()
    labels, keep = kept_pixel_labels(cams, tau=0.25)
    # pixel 1 peaks at 0.2 and pixel 4 exactly at tau: both dropped (max must be > tau)
    assert labels.tolist() == [0, -1, 1, 0, -1]
    assert keep.tolist() == [True, False, True, True, False]


def test_kept_labels_order_matches_feature_pixels():
    cams = torch.zeros(2, 3, 2, 2)
    cams[1, 2, 0, 1] = 0.9  # image 1, row 0, column 1 -> flat index 1*4 + 0*2 + 1 = 5
    labels, keep = kept_pixel_labels(cams, tau=0.5)
    assert keep.nonzero().flatten().tolist() == [5] and labels[5] == 2


def test_value_hand_made():
    # kept: pixels 0 and 3 (class 0, both along e1) and pixel 2 (class 1, along e2).
    # Anchors 0 and 3 each have one positive at cosine 1 and one negative at cosine 0;
    # anchor 2 has no positive and drops out of the mean.
    features, cams = hand_made()
    t = 0.5
    expected = math.log(1 + math.exp(-1 / t))
    assert pscl_loss(features, cams, tau=0.25, temperature=t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed, tau, t, chunk", [(0, 0.25, 0.1, 7), (1, 0.5, 0.1, 1024), (2, 0.6, 0.07, 16),
                                                (3, 0.3, 0.5, 1), (4, 0.8, 0.1, 5)])
def test_value_and_gradient_equal_supcon(seed, tau, t, chunk):
    features, cams = random_case(seed)
    ours = pscl_loss(features, cams, tau=tau, temperature=t, chunk_size=chunk)
    (g_ours,) = torch.autograd.grad(ours, features)

    emb, labels = kept_embeddings(features, cams, tau)
    assert chunk >= 1024 or emb.shape[0] > chunk  # the chunked path is exercised
    ref = SupConLoss(temperature=t)(emb, labels)
    (g_ref,) = torch.autograd.grad(ref, features)

    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_chunked_equals_unchunked_value_and_gradient():
    features, cams = random_case(5, n=3, d=16, h=7, w=7, k=5)
    whole = pscl_loss(features, cams, chunk_size=10_000)
    (g_whole,) = torch.autograd.grad(whole, features)
    for chunk in (1, 13, 64):
        part = pscl_loss(features, cams, chunk_size=chunk)
        (g_part,) = torch.autograd.grad(part, features)
        assert part.item() == pytest.approx(whole.item(), rel=1e-6)
        torch.testing.assert_close(g_part, g_whole, rtol=1e-5, atol=1e-7)


def test_gradcheck_float64_chunked():
    features, cams = random_case(6, n=1, d=4, h=3, w=3, k=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: pscl_loss(f, cams, tau=0.2, temperature=0.5, chunk_size=2), (features,))


def test_dropped_pixels_do_not_matter():
    features, cams = random_case(7, h=6, w=6)
    _, keep = kept_pixel_labels(cams, 0.6)
    assert 0 < keep.sum() < keep.numel()
    drop = (~keep).reshape(features.shape[0], 1, *features.shape[2:])

    loss = pscl_loss(features, cams, tau=0.6, chunk_size=8)
    (grad,) = torch.autograd.grad(loss, features)
    changed = torch.where(drop, torch.randn_like(features) * 100, features).detach().requires_grad_()
    loss2 = pscl_loss(changed, cams, tau=0.6, chunk_size=8)
    (grad2,) = torch.autograd.grad(loss2, changed)

    assert loss2.item() == loss.item()
    assert torch.equal(grad, grad2)
    assert grad.masked_select(drop).abs().max() == 0


def test_background_channel_is_just_another_class():
    features, cams = random_case(8, k=3)
    background = torch.rand(cams.shape[0], 1, *cams.shape[2:], generator=torch.Generator().manual_seed(9))
    with_bg = torch.cat([background, cams], dim=1)
    labels, keep = kept_pixel_labels(with_bg, 0.25)
    assert (labels[keep] == 0).any()  # background labels pixels too
    assert pscl_loss(features, with_bg).item() != pscl_loss(features, cams).item()


def test_max_pixels_is_a_reproducible_sample():
    features, cams = random_case(10, h=8, w=8)
    assert pscl_loss(features, cams, max_pixels=10_000).item() == pscl_loss(features, cams).item()  # cap not reached
    assert sampled(features, cams, 0).item() == sampled(features, cams, 0).item() != sampled(features, cams, 1).item()


def test_max_pixels_sample_equals_supcon_on_the_sample():
    features, cams = random_case(10, h=8, w=8)
    # the sample is the first 40 of a permutation of the kept pixels drawn from the generator
    emb, labels = kept_embeddings(features, cams, 0.25)
    pick = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))[:40]
    ref = SupConLoss(temperature=0.1)(emb[pick], labels[pick])
    assert sampled(features, cams, 0).item() == pytest.approx(ref.item(), rel=1e-5)


def sampled(features, cams, seed):
    return pscl_loss(features, cams, max_pixels=40, generator=torch.Generator().manual_seed(seed))


ZERO_CASES = ["none kept", "one kept", "one label", "no positives"]


def zero_case(case):
    features = torch.randn(1, 4, 2, 2, requires_grad=True)
    cams = torch.full((1, 4, 2, 2), 0.1)
    flat = cams.view(4, 4)  # (K, pixels)
    if case == "one kept":
        flat[0, 0] = 0.9
    elif case == "one label":  # SupConLoss's rule: without a negative pair there is no loss
        flat[2, :] = 0.9
    elif case == "no positives":
        flat[[0, 1, 2, 3], [0, 1, 2, 3]] = 0.9
    return features, cams


@pytest.mark.parametrize("case", ZERO_CASES)
def test_zero_cases(case):
    features, cams = zero_case(case)
    loss = pscl_loss(features, cams)
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph
    assert torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("case", ZERO_CASES)
def test_zero_cases_agree_with_supcon(case):
    features, cams = zero_case(case)
    emb, labels = kept_embeddings(features, cams, 0.25)
    assert SupConLoss(temperature=0.1)(emb, labels).item() == 0.0


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        pscl_loss(torch.randn(2, 8, 5, 5), torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="features must be"):
        pscl_loss(torch.randn(8, 5, 5), torch.rand(2, 3, 5, 5))
