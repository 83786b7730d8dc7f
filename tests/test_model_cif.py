"""CIF: integrate-and-fire against hand-worked examples, scaling, tail handling."""

from __future__ import annotations

import torch

from kdcache.student.cif import Cif, integrate_and_fire

torch.set_num_threads(1)


def one_hot_frames(n: int) -> torch.Tensor:
    """[1, n, n]: frame t is e_t, so a fired vector reads off the weight given to each frame."""
    return torch.eye(n)[None]


def test_fire_hand_example_no_tail():
    # alphas 0.3 0.5 0.4 0.9 0.2, threshold 1:
    #   t1 acc 0.3; t2 acc 0.8; t3 acc 1.2 -> fire c1 = .3 h1 + .5 h2 + .2 h3, keep .2 of h3
    #   t4 acc .2 + .9 = 1.1 -> fire c2 = .2 h3 + .8 h4, keep .1 of h4
    #   t5 acc .1 + .2 = .3 <= 0.5: no tail fire at inference
    alphas = torch.tensor([[0.3, 0.5, 0.4, 0.9, 0.2]])
    fired, lens = integrate_and_fire(one_hot_frames(5), alphas)
    assert lens.tolist() == [2]
    expected = torch.tensor([[0.3, 0.5, 0.2, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8, 0.0]])
    torch.testing.assert_close(fired[0], expected)


def test_fire_hand_example_with_tail():
    # same, last weight 0.6: leftover .1 h4 + .6 h5 weighs .7 > .5 -> fired as a third token
    alphas = torch.tensor([[0.3, 0.5, 0.4, 0.9, 0.6]])
    fired, lens = integrate_and_fire(one_hot_frames(5), alphas)
    assert lens.tolist() == [3]
    expected = torch.tensor([[0.3, 0.5, 0.2, 0, 0], [0, 0, 0.2, 0.8, 0], [0, 0, 0, 0.1, 0.6]])
    torch.testing.assert_close(fired[0], expected)
    # the tail threshold is a setting: at 0.75 the leftover .7 is dropped
    _, lens = integrate_and_fire(one_hot_frames(5), alphas, tail_threshold=0.75)
    assert lens.tolist() == [2]


def test_fire_exact_threshold_and_multiple_fires_in_one_frame():
    # .5 .5 -> fires exactly at t2 (acc reaches 1.0); 1.7 at t3 (possible after scaling)
    # completes one token on its own and leaves .7 -> tail fired.
    alphas = torch.tensor([[0.5, 0.5, 1.7, 0.8]])
    fired, lens = integrate_and_fire(one_hot_frames(4), alphas)
    #   t1 .5; t2 1.0 -> c1 = .5 h1 + .5 h2; t3 1.7 -> c2 = 1.0 h3, keep .7;
    #   t4 .7 + .8 = 1.5 -> c3 = .7 h3 + .3 h4, keep .5 of h4 (not > .5: no tail)
    assert lens.tolist() == [3]
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.7, 0.3]])
    torch.testing.assert_close(fired[0], expected)
    alphas = torch.tensor([[0.2, 2.5, 0.1]])  # t2 fires twice: .8 h2 + .2 h1, then 1.0 h2
    fired, lens = integrate_and_fire(one_hot_frames(3), alphas, tail_threshold=0.75)
    expected = torch.tensor([[0.2, 0.8, 0], [0, 1.0, 0]])  # leftover .7 h2 + .1 h3 = .8 > .75
    assert lens.tolist() == [3]
    torch.testing.assert_close(fired[0, :2], expected)
    torch.testing.assert_close(fired[0, 2], torch.tensor([0, 0.7, 0.1]))


def test_training_scaling_gives_target_length_and_unit_weights():
    # scaled to L = 3: alphas * 3 / 2.3; every fired vector then carries weight exactly 1
    alphas = torch.tensor([[0.3, 0.5, 0.4, 0.9, 0.2], [0.6, 0.6, 0.0, 0.0, 0.0]])
    tl = torch.tensor([3, 1])
    scaled = alphas * (tl / alphas.sum(1))[:, None]
    fired, lens = integrate_and_fire(torch.eye(5).expand(2, 5, 5), scaled, target_lens=tl)
    assert lens.tolist() == [3, 1] and fired.shape == (2, 3, 5)
    torch.testing.assert_close(fired[0].sum(1), torch.ones(3))
    torch.testing.assert_close(fired[1, 0].sum(), torch.tensor(1.0))
    assert torch.all(fired[1, 1:] == 0)
    # hand: scaled[0] = .3913 .6522 .5217 1.1739 .2609 ->
    # c1 = .3913 h1 + .6087 h2; c2 = .0435 h2 + .5217 h3 + .4348 h4; c3 = .7391 h4 + .2609 h5
    s = 3 / 2.3
    expected = torch.tensor(
        [
            [0.3 * s, 1 - 0.3 * s, 0, 0, 0],
            [0, 0.8 * s - 1, 0.4 * s, 2 - 1.2 * s, 0],
            [0, 0, 0, 2.1 * s - 2, 0.2 * s],
        ]
    )
    torch.testing.assert_close(fired[0], expected)


def test_rounding_short_of_target_fires_the_leftover():
    # weights sum to 2 - 1e-6: only one fire in the loop, the leftover becomes token 2
    alphas = torch.tensor([[1.0, 1.0 - 1e-6]], dtype=torch.float64)
    fired, lens = integrate_and_fire(
        torch.eye(2, dtype=torch.float64)[None], alphas, target_lens=torch.tensor([2])
    )
    assert lens.tolist() == [2]
    torch.testing.assert_close(fired[0, 1], torch.tensor([0, 1.0 - 1e-6], dtype=torch.float64))


def test_cif_module_alpha_sum_is_unscaled_and_padding_has_no_weight():
    cif = Cif(8, 3, 0.0, 1.0, 0.5)
    x = torch.randn(2, 9, 8)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    out, lens, alphas, alpha_sum = cif(x, mask, torch.tensor([4, 2]))
    assert torch.all(alphas[1, 5:] == 0)
    torch.testing.assert_close(alpha_sum, alphas.sum(1))
    assert lens.tolist() == [4, 2] and out.shape == (2, 4, 8)
    alpha_sum.sum().backward()
    assert cif.predictor.proj.weight.grad is not None
