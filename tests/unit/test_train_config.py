"""`pyfuse train`'s settings: mlx-lm's flags and YAML keys 1:1, command line
over YAML over mlx-lm's defaults, mlx-lm's lr_schedule form, refusals; the
batch order's state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyfuse.cli import build_parser
from pyfuse.errors import UserError
from pyfuse.train.config import mlx_defaults, read_yaml, resolve, train_kwargs
from pyfuse.train.loop import BatchOrder
from pyfuse.train.settings import check_lr_schedule

from helpers import write_yaml


def _parse(*argv):
    return vars(build_parser().parse_args(["train", *argv]))


def test_every_mlx_lm_flag_is_accepted_with_its_name():
    from mlx_lm.lora import build_parser as mlx_parser

    ours = {a.dest: a.option_strings for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for action in mlx_parser()._actions:
        if action.dest == "help":
            continue
        assert action.dest in ours, action.dest
        assert set(action.option_strings) <= set(ours[action.dest]), (action.option_strings, ours[action.dest])


def test_every_mlx_lm_yaml_key_is_read(tmp_path):
    cfg = mlx_defaults()
    cfg.update(model="m", data="d", iters=7)
    assert read_yaml(write_yaml(tmp_path / "c.yaml", cfg))["iters"] == 7
    with pytest.raises(UserError, match="unknown key lerning_rate"):
        read_yaml(write_yaml(tmp_path / "bad.yaml", {"lerning_rate": 1e-4}))


def test_cli_over_yaml_over_mlx_lm_defaults(tmp_path):
    # mlx-lm's loader reads 1e-5 as a float (PyYAML alone reads a string)
    (tmp_path / "c.yaml").write_text("model: m\ndata: d\nlearning_rate: 1e-5\nbatch_size: 2\niters: 50\n"
                                     "lora_parameters: {rank: 16, scale: 10.0, dropout: 0.05}\n"
                                     "lr_schedule: {name: cosine_decay, warmup: 5, arguments: [1e-5, 50, 1e-7]}\n")
    s = resolve(_parse("-c", str(tmp_path / "c.yaml"), "--iters", "9", "--rank", "4"))
    assert s["learning_rate"] == 1e-5 and isinstance(s["learning_rate"], float)
    assert s["iters"] == 9 and s["batch_size"] == 2  # CLI > YAML
    assert s["steps_per_eval"] == 200 and s["save_every"] == 100  # mlx-lm's defaults
    kw = train_kwargs(s)
    assert (kw["rank"], kw["scale"], kw["dropout"]) == (4, 10.0, 0.05)  # --rank over lora_parameters.rank
    assert kw["layers"] == "last:16" and kw["lr_schedule"]["warmup"] == 5
    kw = train_kwargs(resolve(_parse("--model", "m", "--data", "d", "--num-layers", "-1", "--rank", "8",
                                     "--alpha", "16")))
    assert kw["layers"] is None and kw["scale"] == 2.0 and kw["grad_accumulation_steps"] == 1
    assert train_kwargs(resolve(_parse("--model", "m", "--data", "d", "--grad-accumulation", "4")))[
        "grad_accumulation_steps"] == 4


def test_refusals(tmp_path):
    for argv, fragment in [(("--fine-tune-type", "dora", "--report-to", "wandb"), "online services"),
                           (("--num-layers", "0"), "num_layers must be"),
                           (("--num-layers", "4", "--layers", "1,2"), "not both")]:
        with pytest.raises(UserError, match=fragment):
            train_kwargs(resolve(_parse("--model", "m", "--data", "d", *argv)))


def test_full_fine_tune_keys(tmp_path):
    """mlx-lm's spelling in YAML (fine_tune_type: full, num_layers: the last
    N) reaches train_adapter; the CLI overrides the YAML's requant_policy."""
    (tmp_path / "full.yaml").write_text("fine_tune_type: full\nnum_layers: 2\nrequant_policy: preserve\n")
    kw = train_kwargs(resolve(_parse("-c", str(tmp_path / "full.yaml"))))
    assert (kw["fine_tune_type"], kw["layers"], kw["requant_policy"]) == ("full", "last:2", "preserve")
    kw = train_kwargs(resolve(_parse("-c", str(tmp_path / "full.yaml"), "--requant-policy", "stock")))
    assert kw["requant_policy"] == "stock"
    assert train_kwargs(resolve(_parse("--fine-tune-type", "full")))["requant_policy"] == "stock"


def test_lr_schedule_warmup_and_cosine_as_mlx_lm_expresses_it():
    from mlx_lm.tuner.utils import build_schedule

    sched = {"name": "cosine_decay", "arguments": [2e-4, 100, 1e-6], "warmup": 10, "warmup_init": 0.0}
    check_lr_schedule(sched)
    fn = build_schedule(sched)
    for step in (0, 5, 10, 11, 60, 110, 200):  # independent formula: linear warmup, then cosine
        if step < 10:
            expected = 2e-4 * step / 10
        else:
            t = min(step - 11, 100) if step > 10 else 0
            expected = 1e-6 + 0.5 * (2e-4 - 1e-6) * (1 + math.cos(math.pi * t / 100))
        if step == 10:
            expected = 2e-4
        assert fn(step).item() == pytest.approx(expected, rel=1e-5), step
    for bad, fragment in [({"name": "nope", "arguments": [1e-4]}, "unknown schedule"),
                          ({"name": "cosine_decay"}, "name and arguments"),
                          ({"name": "cosine_decay", "arguments": [1e-4, 10], "warm": 3}, "unknown key"),
                          ({"name": "cosine_decay", "arguments": []}, "non-empty list")]:
        with pytest.raises(UserError, match=fragment):
            check_lr_schedule(bad)


def test_batch_order_is_mlx_lms_and_restores():
    lengths = [5, 3, 9, 1, 7, 2, 8]
    order = BatchOrder(lengths, 2, seed=3)
    # mlx-lm's groups: ids sorted by length, cut into batch_size, remainder dropped
    assert order.groups == [[3, 5], [1, 0], [4, 6]]
    # the same permutations as mlx-lm's global NumPy generator seeded alike
    np.random.seed(3)
    expected = [order.groups[i] for _ in range(3) for i in np.random.permutation(3)]
    seen = [order.next() for _ in range(4)]
    saved = order.state()
    again = BatchOrder(lengths, 2, seed=99)
    again.restore(saved)
    seen += [again.next() for _ in range(5)]
    assert seen == expected
