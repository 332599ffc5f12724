"""`make demo` says what it is about to do and roughly how long it takes, before it starts."""

from __future__ import annotations

import re

import pytest

from imgaug_gen.config import compose_config
from imgaug_gen.demo import MEASURED, estimate_seconds, plan_message


def _cfg(*extra):
    return compose_config("train", ["experiment=digits_cgan", "run_dir=/tmp/x", *extra])


def test_plan_message_names_the_work_and_the_time():
    msg = plan_message(_cfg(), 100)
    assert msg.startswith(
        "Training a conditional GAN on sklearn digits (50 images/class, 16 px) for 2,000 "
        "optimiser steps, then generating and scoring a folder (100 synthetic images/class): "
    )
    minutes = round(estimate_seconds(2000, 100) / 60)
    assert msg.endswith(f"about {minutes} min on 2 CPU cores.") and minutes >= 1


def test_estimate_scales_with_the_steps_and_images():
    assert MEASURED["train_s"] > 0 and MEASURED["other_s"] > 0  # a measured figure, not a placeholder
    steps = MEASURED["steps"]
    full = estimate_seconds(steps, 100)
    assert full == pytest.approx(MEASURED["train_s"] + MEASURED["other_s"])
    assert estimate_seconds(2 * steps, 100) - full == pytest.approx(MEASURED["train_s"])
    assert estimate_seconds(300, 100) < full and estimate_seconds(steps, 10) < full
    short = plan_message(_cfg("trainer.max_steps=20", "data.shots=5"), 10)
    assert "(5 images/class, 16 px) for 20 optimiser steps" in short
    assert re.search(r": (under a minute|about \d+ min) on 2 CPU cores\.$", short)
    assert "all images" in plan_message(_cfg("data.shots=null"))


def test_demo_prints_the_plan_before_training(monkeypatch, capsys, tmp_path):
    import imgaug_gen.jobs.train
    from imgaug_gen import demo

    class Started(Exception):
        pass

    def fake_train(cfg):
        assert "optimiser steps" in capsys.readouterr().out  # already printed
        raise Started

    monkeypatch.setattr(imgaug_gen.jobs.train, "train", fake_train)
    with pytest.raises(Started):
        demo.main(["--out", str(tmp_path / "d"), "--steps", "40"])
