"""Anchor and RoI sampling keyed by each sample's stream seed: the draw of an image depends on its
``sample_seed`` alone, not on the batch it is in, the process it runs in or the global RNG."""
import torch

from detkit.models.roi_heads import RoIHeadsSettings
from detkit.models.rpn import AnchorSettings, RPNSettings
from detkit.models.roi_heads import RoIHeads
from detkit.models.rpn import RegionProposalNetwork, sample_balanced
from detkit.ops import BalancedSampler


def make_rpn(**kw):
    return RegionProposalNetwork(RPNSettings(**kw, anchors=AnchorSettings(sizes=[32.0, 64.0], aspect_ratios=[1.0])), 8, 16)


def random_labels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n,), generator=g).float()


def test_seeded_draw_follows_the_balanced_sampler_rules():
    sampler = BalancedSampler(32, 0.25)
    labels = torch.stack([
        torch.cat([torch.ones(20), torch.zeros(100), -torch.ones(10)]),  # 8 positives, 24 negatives
        torch.cat([torch.ones(3), torch.zeros(100), -torch.ones(27)]),   # 3 positives, filled with negatives
        torch.cat([torch.ones(50), torch.zeros(5), -torch.ones(75)]),    # too few negatives
        -torch.ones(130),                                                # nothing to draw
    ])
    pos, neg = sample_balanced(labels, [torch.Generator().manual_seed(s) for s in range(4)], sampler)
    assert pos.sum(1).tolist() == [8, 3, 8, 0] and neg.sum(1).tolist() == [24, 29, 5, 0]
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all() and not (pos & neg).any()


def test_seeded_draw_is_uniform():
    # 10 positives, 4 taken: each is taken in 40% of the draws.
    labels = torch.cat([torch.ones(10), torch.zeros(50)]).expand(4000, -1)
    pos, _ = sample_balanced(labels, [torch.Generator().manual_seed(s) for s in range(4000)], BalancedSampler(8, 0.5))
    rate = pos[:, :10].float().mean(0)
    assert ((rate - 0.4).abs() < 0.05).all(), rate


def test_an_image_draws_the_same_anchors_in_any_batch():
    rpn = make_rpn(batch_size_per_image=16, positive_fraction=0.5)
    n = rpn.anchor_generators[0].grid_anchors((6, 6)).shape[0]
    a, b = random_labels(n, 0), random_labels(n, 1)
    torch.manual_seed(0)
    pos_ab, neg_ab = rpn.sample(torch.stack([a, b]), [{"sample_seed": 7}, {"sample_seed": 8}])
    torch.manual_seed(1)  # the global RNG plays no part
    pos_a, neg_a = rpn.sample(a[None], [{"sample_seed": 7}])
    pos_b, neg_b = rpn.sample(b[None], [{"sample_seed": 8}])
    assert torch.equal(pos_ab, torch.cat([pos_a, pos_b])) and torch.equal(neg_ab, torch.cat([neg_a, neg_b]))
    # Another seed, another draw.
    assert not torch.equal(neg_a, rpn.sample(a[None], [{"sample_seed": 9}])[1])


def test_without_sample_seed_the_global_rng_draws():
    rpn = make_rpn(batch_size_per_image=16, positive_fraction=0.5)
    labels = random_labels(rpn.anchor_generators[0].grid_anchors((6, 6)).shape[0], 0)
    torch.manual_seed(3)
    pos, neg = rpn.sample(labels[None], [{}])
    torch.manual_seed(3)
    expected = rpn.sampler(labels)
    assert torch.equal(pos[0], expected[0]) and torch.equal(neg[0], expected[1])


def test_an_image_draws_the_same_rois_in_any_batch():
    heads = RoIHeads(RoIHeadsSettings(batch_size_per_image=16, positive_fraction=0.25), None, None, None, num_classes=3)
    g = torch.Generator().manual_seed(0)

    def image():
        xy = torch.rand(200, 2, generator=g) * 80
        props = torch.cat([xy, xy + 10 + torch.rand(200, 2, generator=g) * 40], 1)
        return props, {"boxes": props[:2] + 1.0, "labels": torch.tensor([1, 2])}

    (pa, ta), (pb, tb) = image(), image()
    ta, tb = {**ta, "sample_seed": 11}, {**tb, "sample_seed": 12}
    torch.manual_seed(0)
    props_ab, labels_ab, deltas_ab = heads.select_training_samples([pa, pb], [ta, tb])
    torch.manual_seed(1)
    props_a, labels_a, deltas_a = heads.select_training_samples([pa], [ta])
    assert torch.equal(props_ab[0], props_a[0])
    assert torch.equal(labels_ab[:len(labels_a)], labels_a) and torch.equal(deltas_ab[:len(deltas_a)], deltas_a)


def test_loader_gives_each_sample_the_seed_of_its_stream_position():
    from detkit.data.loading import PositionSeeded, StreamBatchSampler

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return index, {"image_id": index}

    data = PositionSeeded(Items())
    one = iter(StreamBatchSampler(list(range(10)), 2, seed=3))
    ranks = [iter(StreamBatchSampler(list(range(10)), 1, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for _ in range(8):  # past the end of an epoch
        assert [data[item] for item in next(one)] == [data[next(r)[0]] for r in ranks]
    first = data[next(iter(StreamBatchSampler(list(range(10)), 2, seed=3, start_position=4)))[0]]
    assert first[1]["sample_seed"] == 3 * 1000003 + 4
