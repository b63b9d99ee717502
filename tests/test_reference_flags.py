"""The reference's `-1` ("never") is accepted by every training stage's *_every flags, and
anything below it is refused."""
from __future__ import annotations

import pytest

from nanochat.stages import base_train, rl, sft

EVERY = {base_train: ("eval_every", "core_metric_every", "sample_every", "save_every"),
         sft: ("eval_every", "chatcore_every", "save_every"),
         rl: ("eval_every", "save_every")}


@pytest.mark.parametrize("stage", list(EVERY), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_minus_one_is_never_and_below_is_an_error(stage):
    for name in EVERY[stage]:
        stage.Config(**{name: -1}).validate()  # accepted
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be >= 0, or -1 for never"):
            stage.Config(**{name: -2}).validate()
