"""Partial fuses by layer group / index range / module glob
(pyfuse.fuse.layers, ``pyfuse fuse --layers/--modules``)."""

from __future__ import annotations

import re

import pytest
from helpers import DOWN, differing, model_tensors, module_tensors, run_cli

from pyfuse.errors import UserError
from pyfuse.fuse.layers import group_bounds, select_layers, selection_only


@pytest.mark.parametrize("n,expect", [
    (48, {"early": (0, 16), "middle": (16, 32), "late": (32, 48)}),
    (4, {"early": (0, 1), "middle": (1, 3), "late": (3, 4)}),
    (2, {"early": (0, 1), "middle": (1, 1), "late": (1, 2)}),
])
def test_groups_cover_every_block_once(n, expect):
    g = group_bounds(n)
    assert {k: (r.start, r.stop) for k, r in g.items() if k != "all"} == expect
    assert sorted([*g["early"], *g["middle"], *g["late"]]) == list(range(n)) == list(g["all"])


def test_select_layers_forms_and_errors():
    assert select_layers("late", 48) == list(range(32, 48))
    assert select_layers("0-2, 8,-1", 10) == [0, 1, 2, 8, 9]
    assert select_layers([3, -2], 5) == [3]  # -2 of 5 is 3
    assert select_layers(7, 8) == [7]
    with pytest.raises(UserError, match="selects no block of a 2-block model"):
        select_layers("middle", 2)
    with pytest.raises(UserError, match="outside"):
        select_layers("0-9", 4)
    with pytest.raises(UserError, match="not a group"):
        select_layers("first", 4)


def test_selection_only_is_the_conjunction():
    paths = [f"model.layers.{i}.{m}" for i in range(4) for m in ("self_attn.q_proj", DOWN)] + ["lm_head"]
    rx = re.compile(selection_only("proj", layers="middle", modules=["*.self_attn.*"], prefix="model.layers",
                                   n_layers=4))
    assert [p for p in paths if rx.search(p)] == ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert selection_only("x") == "x"
    rx = re.compile(selection_only(None, layers="1", prefix="model.layers", n_layers=12))
    assert not rx.search("model.layers.11.mlp.gate") and rx.search("model.layers.1.mlp.gate")


def test_cli_layers_and_modules_fuse_exactly_the_selected_modules(tmp_path, tiny_moe_dir, moe_adapter):
    """moe_adapter covers blocks 2 and 3 (of 4: early 0, middle 1-2, late 3); the late fuse equals
    the fuse --only picks by hand, byte for byte, and leaves block 2 as it was."""
    def fuse(name, *flags):
        run = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path",
                      tmp_path / name, "--quiet", *flags)
        assert run.code == 0, run.err
        return model_tensors(tmp_path / name)

    base = model_tensors(tiny_moe_dir)
    late = fuse("late", "--layers", "late")
    by_hand = fuse("by-hand", "--only", r"^model\.layers\.3\.")
    assert not differing(late, by_hand)
    changed = differing(base, late)
    assert changed and all(n.startswith("model.layers.3.") for n in changed)
    attn = fuse("attn", "--modules", "*.self_attn.*")
    changed = differing(base, attn)
    assert changed and {n.rsplit(".", 1)[0] for n in changed} <= {f"model.layers.{i}.self_attn.q_proj" for i in (2, 3)}
    assert module_tensors(changed, "model.layers.2.self_attn.q_proj")
    bad = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path",
                  tmp_path / "bad", "--layers", "9")
    assert bad.code == 2 and "outside" in bad.err and not (tmp_path / "bad").exists()
