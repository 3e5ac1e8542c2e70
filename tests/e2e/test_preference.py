"""DPO and ORPO: the reference log-probabilities, the losses, margins and
accuracies recomputed in NumPy from per-token log-probabilities of
mlx-lm's own model (loaded by mlx-lm, the adapter by mlx-lm's loader);
training moves the margin the right way; refusals."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.errors import UserError
from pyfuse.train import train_adapter

from helpers import read_json, write_jsonl

BETA = 0.5
PAIRS = [{"prompt": f"status of task {i}?", "chosen": f"Done. Ship {i}.",
          "rejected": f"Great question! I'd be happy to help you with task {i}."} for i in range(8)]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_jsonl(root / "train.jsonl", PAIRS[:6])
    write_jsonl(root / "valid.jsonl", PAIRS[6:] + PAIRS[:2])
    return root


def _numpy_logps(model, tok, row: dict, side: str) -> float:
    """sum over the reply tokens of log p(token | before), NumPy from mlx-lm's logits."""
    prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row[side]}])
    assert full[:len(prompt)] == prompt
    logits = np.array(model(mx.array([full[:-1]])).astype(mx.float32), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return float(sum(logp[j - 1, full[j]] for j in range(len(prompt), len(full))))


def _numpy_side_counts(tok, row, side) -> int:
    prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row[side]}])
    return len(full) - len(prompt)


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, tiny_llama_dir, pairs_dir):
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    res = train_adapter(tiny_llama_dir, pairs_dir, out, train_mode="dpo", beta=BETA, keys=["self_attn.q_proj",
                        "self_attn.v_proj", "mlp.down_proj"], rank=4, alpha=8, iters=8, batch_size=2,
                        learning_rate=2e-2, steps_per_report=2, steps_per_eval=4, seed=0)
    return out, res


def test_reference_logps_are_the_starting_models(dpo, tiny_llama_dir):
    from mlx_lm import load

    out, _ = dpo
    ref = mx.load(str(out / "reference_logps.safetensors"))
    base, tok = load(str(tiny_llama_dir))
    expected = np.array([[_numpy_logps(base, tok, r, s) for s in ("chosen", "rejected")] for r in PAIRS[:6]])
    np.testing.assert_allclose(np.array(ref["train"]), expected, rtol=1e-4, atol=1e-3)


def test_dpo_loss_margins_and_accuracy_against_numpy(dpo, tiny_llama_dir, pairs_dir):
    from mlx_lm import load

    from pyfuse.train.preference import PairDataset, collate_pairs, dpo_loss

    out, res = dpo
    ref = np.array(mx.load(str(out / "reference_logps.safetensors"))["train"], np.float64)
    model, tok = load(str(tiny_llama_dir), adapter_path=str(out))  # mlx-lm's loader (LoRA)
    policy = np.array([[_numpy_logps(model, tok, r, s) for s in ("chosen", "rejected")] for r in PAIRS[:6]])
    margin = BETA * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    loss = np.mean(np.log1p(np.exp(-margin)))  # -log sigmoid
    ds = PairDataset(PAIRS[:6], tok)
    ds.ref = ref.astype(np.float32)
    got = dpo_loss(model, *collate_pairs(ds, list(range(6)), 2048), beta=BETA)
    assert got[0].item() == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert got[2].item() == pytest.approx(margin.mean(), rel=1e-3, abs=1e-4)
    assert got[3].item() == pytest.approx((margin > 0).mean())
    # training pushed the chosen replies up relative to the rejected ones
    assert margin.mean() > 0 and res.losses[-1]["reward_margin"] > res.losses[0]["reward_margin"]
    first = res.val_losses[0]
    assert first["val_loss"] == pytest.approx(np.log(2), rel=1e-4)  # the policy starts as its reference
    assert first["val_reward_margin"] == pytest.approx(0, abs=1e-4)
    assert set(res.losses[0]) >= {"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"}
    assert read_json(out / "adapter_config.json")["train_mode"] == "dpo"


def test_orpo_loss_against_numpy(tiny_llama_dir, pairs_dir, tmp_path):
    from mlx_lm import load

    from pyfuse.train.preference import PairDataset, collate_pairs, orpo_loss

    res = train_adapter(tiny_llama_dir, pairs_dir / "train.jsonl", tmp_path / "o", train_mode="orpo", beta=BETA,
                        keys=["self_attn.q_proj"], rank=2, alpha=4, iters=2, batch_size=2, learning_rate=1e-2)
    assert not (tmp_path / "o" / "reference_logps.safetensors").exists()  # ORPO has no reference
    model, tok = load(str(tiny_llama_dir), adapter_path=str(tmp_path / "o"))
    rows = PAIRS[:4]
    lp = np.array([[_numpy_logps(model, tok, r, s) for s in ("chosen", "rejected")] for r in rows])
    counts = np.array([[_numpy_side_counts(tok, r, s) for s in ("chosen", "rejected")] for r in rows])
    mean = lp / counts
    log_odds = mean - np.log1p(-np.exp(mean))
    ratio = log_odds[:, 0] - log_odds[:, 1]
    expected = -lp[:, 0].sum() / counts[:, 0].sum() + BETA * np.mean(np.log1p(np.exp(-ratio)))
    got = orpo_loss(model, *collate_pairs(PairDataset(rows, tok), list(range(4)), 2048), beta=BETA)
    assert got[0].item() == pytest.approx(expected, rel=1e-4)
    assert res.final_loss is not None


def test_modes_need_their_data(tiny_llama_dir, pairs_dir, tmp_path):
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(UserError, match="needs preference pairs"):
        train_adapter(tiny_llama_dir, sft_rows, tmp_path / "x", train_mode="dpo", batch_size=1)
    with pytest.raises(UserError, match="the data is preference pairs"):
        train_adapter(tiny_llama_dir, pairs_dir, tmp_path / "x", batch_size=1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": ""}])
    with pytest.raises(UserError, match="field 'rejected' must be a non-empty string"):
        train_adapter(tiny_llama_dir, bad, tmp_path / "x", train_mode="dpo", batch_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "sft.jsonl"]


def test_pairs_from_sft_data_then_dpo(tiny_llama_dir, tmp_path):
    """`pyfuse pairs`: the real reply is chosen, the model's own greedy reply
    (mlx-lm's generate, independently) rejected; the pairs train with DPO."""
    from mlx_lm import generate, load

    from helpers import read_jsonl, run_cli

    rows = [{"messages": [{"role": "user", "content": f"status {i}?"}, {"role": "assistant", "content": f"Done {i}."}]}
            for i in range(4)]
    write_jsonl(tmp_path / "sft" / "train.jsonl", rows)
    write_jsonl(tmp_path / "sft" / "valid.jsonl", rows[:2])
    res = run_cli("pairs", "--model", tiny_llama_dir, "--data", tmp_path / "sft", "--out", tmp_path / "p",
                  "--max-tokens", "8", "--batch-size", "2")
    assert res.code == 0, res.err
    pairs = read_jsonl(tmp_path / "p" / "train.jsonl")
    assert len(read_jsonl(tmp_path / "p" / "valid.jsonl")) == 2
    model, tok = load(str(tiny_llama_dir))
    for row, pair in zip(rows, pairs):
        assert pair["chosen"] == row["messages"][-1]["content"] and pair["messages"] == row["messages"][:1]
        prompt = tok.apply_chat_template(pair["messages"], add_generation_prompt=True, enable_thinking=False)
        assert pair["rejected"] == generate(model, tok, prompt, max_tokens=8)
    dpo = train_adapter(tiny_llama_dir, tmp_path / "p", tmp_path / "ad", train_mode="dpo", keys=["self_attn.q_proj"],
                        rank=2, alpha=4, iters=2, batch_size=2, learning_rate=1e-2)
    assert dpo.losses and "reward_margin" in dpo.losses[-1]
    again = run_cli("pairs", "--model", tiny_llama_dir, "--data", tmp_path / "sft", "--out", tmp_path / "p")
    assert again.code == 2 and "exists" in again.err
