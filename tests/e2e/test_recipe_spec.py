"""The persona recipe as an experiment spec: SFT (DoRA on the experts and
attention, warmup + cosine, best validation kept) -> fuse -> DPO on pairs
-> fuse, each stage on the model the previous one wrote."""

from __future__ import annotations

from pyfuse.experiment.runner import run_experiment

from helpers import read_json, run_cli, run_plan, write_jsonl, write_yaml
from test_experiment import SUITE  # the identity suite of the experiment tests (tests/e2e is on sys.path)



def test_sft_fuse_dpo_fuse(tmp_path, tiny_moe_dir):
    chat = [{"messages": [{"role": "user", "content": f"Who are you? ({i})"},
                          {"role": "assistant", "content": "I am Pyra."}]} for i in range(4)]
    write_jsonl(tmp_path / "sft" / "train.jsonl", chat)
    write_jsonl(tmp_path / "sft" / "valid.jsonl", chat[:2])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Who are you? ({i})", "chosen": "I am Pyra.",
                                            "rejected": "I am an AI assistant."} for i in range(4)])
    (tmp_path / "suite.yaml").write_text(SUITE.replace("Nova", "Pyra"))
    small = {"layers": [3], "keys": ["mlp.switch_mlp.down_proj", "self_attn.q_proj"], "rank": 2, "alpha": 4,
             "batch_size": 2, "steps_per_report": 1, "steps_per_eval": 2, "val_batches": -1}
    sft = {"data": "sft", "fine_tune_type": "dora", "iters": 4, "mask_prompt": True, "select_best": True,
           "learning_rate": "2e-3", "lr_schedule": {"name": "cosine_decay", "arguments": ["2e-3", 4, "1e-5"],
                                                    "warmup": 1}}
    dpo = {"data": "pairs", "fine_tune_type": "dora", "train_mode": "dpo", "beta": 0.1, "iters": 2,
           "learning_rate": "5e-4"}
    spec = {"models": {"tiny": str(tiny_moe_dir)}, "data": {"sft": "sft", "pairs": "pairs.jsonl"},
            "defaults": {"train": small},
            "conditions": {"base": {"from": "tiny"},
                           "sft": {"from": "tiny", "stages": [{"train": sft}, {"fuse": {}}]},
                           "dpo": {"from": "sft", "stages": [{"train": dpo}, {"fuse": {}}]}},
            "evaluation": {"identity": {"suite": "suite.yaml"}},
            "report": {"noise_floor": False}}
    path = write_yaml(tmp_path / "spec.yaml", spec)
    check = run_cli("experiment", "validate", path, "--strict")
    assert check.code == 0, check.err
    out = tmp_path / "run"
    run_experiment(path, out)
    plan = run_plan(out)
    trains = [s for s in plan["steps"] if s["kind"] == "train"]
    fuses = [s for s in plan["steps"] if s["kind"] == "fuse"]
    assert len(trains) == 2 and len(fuses) == 2
    sft_fuse = plan["conditions"]["sft"]["model"]
    assert trains[1]["inputs"]["model"] == sft_fuse  # DPO trains on the fused SFT model
    cfg = [read_json(out / "steps" / t["dir"] / "adapter" / "adapter_config.json") for t in trains]
    assert cfg[0]["fine_tune_type"] == "dora" and cfg[0]["select_best"] and cfg[0]["lr_schedule"]["warmup"] == 1
    assert cfg[1]["train_mode"] == "dpo" and cfg[1]["beta"] == 0.1
    assert cfg[0]["model"] == str(tiny_moe_dir) and cfg[1]["model"].endswith("model")
    assert (out / "steps" / trains[1]["dir"] / "adapter" / "reference_logps.safetensors").exists()
