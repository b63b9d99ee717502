"""The depth dial's rules and the schedules, as pure functions."""
import math

import pytest

from nanochat import scaling


def test_model_dims_rounds_width_up_to_head_dim():
    assert scaling.model_dims(20) == (1280, 10)
    assert scaling.model_dims(12) == (768, 6)
    assert scaling.model_dims(4, 64, 128) == (256, 2)
    assert scaling.model_dims(3, 64, 128) == (256, 2)  # 192 nudged up to 256
    with pytest.raises(ValueError):
        scaling.model_dims(0)


def test_power_lines_batch_size():
    ref = 1e9
    assert scaling.auto_total_batch_size(ref, ref) == 2 ** 19
    # doubling the horizon grows the batch by 2^0.383 ≈ 1.3, which rounds to the same power of two
    assert scaling.auto_total_batch_size(2 * ref, ref) == 2 ** 19
    # 2^(1/0.383) ≈ 6.1× the horizon → one power of two up
    assert scaling.auto_total_batch_size(7 * ref, ref) == 2 ** 20
    assert scaling.auto_total_batch_size(ref / 7, ref) == 2 ** 18


def test_lr_and_weight_decay_transfer():
    assert scaling.batch_lr_scale(2 ** 19) == 1.0
    assert scaling.batch_lr_scale(2 ** 21) == pytest.approx(2.0)
    # same batch and horizon as the reference: unchanged
    assert scaling.scaled_weight_decay(0.28, 2 ** 19, 5e9, 5e9) == pytest.approx(0.28)
    # T_epoch = B/(η λ D) stays constant
    B, D, Bref, Dref = 2 ** 20, 2e10, 2 ** 19, 5e9
    lam = scaling.scaled_weight_decay(0.28, B, D, Dref)
    eta = scaling.batch_lr_scale(B)
    assert B / (eta * lam * D) == pytest.approx(Bref / (1.0 * 0.28 * Dref))


def test_lr_schedule_shape():
    n, warm = 100, 10
    lrm = [scaling.lr_multiplier(s, n, warm, 0.5, 0.05) for s in range(n + 1)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrm[10:51])
    assert lrm[n] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrm[50:], lrm[51:]))


def test_muon_momentum_and_weight_decay_schedules():
    n = 1000
    assert scaling.muon_momentum(0, n, 0.5) == pytest.approx(0.85)
    assert scaling.muon_momentum(400, n, 0.5) == pytest.approx(0.97)
    assert scaling.muon_momentum(n, n, 0.5) == pytest.approx(0.90)
    assert scaling.muon_weight_decay(0, n, 0.2) == pytest.approx(0.2)
    assert scaling.muon_weight_decay(n // 2, n, 0.2) == pytest.approx(0.1)
    assert scaling.muon_weight_decay(n, n, 0.2) == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(scaling.muon_momentum(5, 10, 0.0))
