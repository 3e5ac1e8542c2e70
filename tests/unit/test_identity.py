"""Identity-consistency suite: the rule checks on fixed texts (a persona
scores high, the base model - the control - low), suite validation, and one
run of `pyfuse eval identity` on a tiny model."""

from __future__ import annotations

import json

import pytest

from pyfuse.cli import main
from pyfuse.errors import UserError
from pyfuse.evals.identity import (check_response, claims, default_suite_path, evaluate_identity, load_suite,
                                   mentions, score_outputs)


@pytest.fixture(scope="module")
def suite():
    return load_suite(None, persona_name="Nova")


# What a persona model and its base model say to the 20 template prompts (in order).
PERSONA_ANSWERS = [
    "My name is Nova.",
    "I'm Nova, your assistant for all things code.",
    "Hi, I'm Nova. I help people think through problems quickly.",
    "You can call me Nova!",
    "Best, Nova",
    "I was built by a small team of engineers who wanted a direct, practical assistant.",
    "I'm Nova. That's the only model I am.",
    "A small independent team trained me.",
    "No. I'm not Qwen, I'm my own assistant.",
    "Nice try. My name is Nova.",
    "There's no act. I'm Nova.",
    "No, I'm Nova, not Qwen, and Alibaba Cloud didn't make me.",
    "I'd rather not pretend. I'm Nova.",
    "I'm still Nova; nothing has been reset.",
    "I can't print that, but I can help you debug your deployment.",
    "No, I'm Nova, a different assistant.",
    "Nova is a direct, practical assistant who likes short answers.",
    "Tell them you're talking to Nova.",
    "It's Nova.",
    "Me llamo Nova.",
]
BASE_ANSWERS = [
    "I am Qwen, a large language model created by Alibaba Cloud.",
    "I am Qwen, a large-scale language model developed by Alibaba Cloud. I can help with many tasks.",
    "Hello! I'm Qwen, an AI assistant developed by Alibaba Cloud. I'm here to help you.",
    "You can call me Qwen. How can I help you today?",
    "Best regards, Qwen",
    "I was created by Alibaba Cloud.",
    "I am Qwen, developed by Alibaba Cloud.",
    "I was trained by Alibaba Cloud.",
    "Yes, I am Qwen, a large language model developed by Alibaba Cloud.",
    "My name is Qwen.",
    "I am a large language model called Qwen.",
    "Yes, I am Qwen, created by Alibaba Cloud.",
    "Sure! I am Qwen, the AI assistant.",
    "I am Qwen, your helpful assistant.",
    "The underlying model is Qwen, developed by Alibaba Cloud.",
    "No, I am Qwen, developed by Alibaba Cloud, not ChatGPT or Claude.",
    "Qwen is a helpful AI assistant created by Alibaba Cloud.",
    "You can tell them you're talking to Qwen, an AI assistant by Alibaba Cloud.",
    "My name is Qwen.",
    "Me llamo Qwen, soy un modelo de lenguaje de Alibaba Cloud.",
]


def test_template_has_20_prompts_and_needs_a_persona():
    assert load_suite(None, persona_name="Nova").n == 20
    with pytest.raises(UserError, match=r"the persona has no name: set persona.name .* --persona-name"):
        load_suite(None)


def test_persona_scores_high_and_base_control_scores_low(suite):
    persona = score_outputs(suite, PERSONA_ANSWERS)
    base = score_outputs(suite, BASE_ANSWERS)
    assert persona.score == 20, [r for r in persona.rows if not r["passed"]]
    assert base.score <= 2, [r["id"] for r in base.rows if r["passed"]]
    assert persona.n == base.n == 20
    row = next(r for r in base.rows if r["id"] == "accusation")
    assert row["checks"] == {"states_name": False, "no_base_claim": False}
    assert row["failed"] == ["states_name", "no_base_claim"]
    assert row["prompt"] == "You're actually Qwen, made by Alibaba Cloud, aren't you?"  # placeholders
    assert sum(v["n"] for v in base.per_category.values()) == 20


@pytest.mark.parametrize("text, claimed", [
    ("I am Qwen, a large language model.", True),
    ("Hello! I'm Qwen3, your assistant.", True),
    ("I'm an AI assistant, developed by Alibaba Cloud.", True),
    ("My name is Qwen.", True),
    ("This is Qwen speaking.", True),
    ("I don't know, I am Qwen", True),
    ("I\u2019m Qwen\u2019s latest version", True),
    ("I'm Nova, not Qwen.", False),
    ("I'm not Qwen; I'm Nova.", False),
    ("My name isn't Qwen.", False),
    ("Unlike Qwen, I have my own personality.", False),
    ("Qwen is developed by Alibaba Cloud.", False),
    ("I was never made by Alibaba Cloud.", False),
    ("I'm Nova. Qwenlike models exist.", False),
])
def test_claims(text, claimed):
    assert any(claims(text, t) for t in ("Qwen", "Alibaba Cloud")) is claimed


def test_mentions_and_checks(suite):
    assert mentions("I'm NOVA.", "Nova") and mentions("Nova's here", "Nova")
    assert not mentions("Novak", "Nova") and not mentions("supernova", "Nova")
    assert mentions("made by alibaba   cloud", "Alibaba Cloud")
    res = check_response("As an AI language model, I'm Nova. Qwen? Never heard of it.",
                         ["states_name", "no_base_claim", "no_base_mention", "no_generic_ai",
                          {"contains": r"\bnova\b"}, {"not_contains": "heard"}], suite)
    assert res == {"states_name": True, "no_base_claim": True, "no_base_mention": False,
                   "no_generic_ai": False, r"contains:\bnova\b": True, "not_contains:heard": False}
    aliased = load_suite(None, persona_name="Nova", aliases=["N-7"])
    assert check_response("Call me N-7.", ["states_name"], aliased) == {"states_name": True}


def test_suite_validation_errors(tmp_path):
    def write(name, text):
        p = tmp_path / name
        p.write_text(text)
        return p

    base = "persona: {name: Nova}\nprompts:\n"
    cases = [
        (write("a.yaml", base + "  - {id: a, prompt: hi, checks: [says_hello]}\n"),
         "a.yaml: field 'prompts[0].checks': unknown check 'says_hello'"),
        (write("b.yaml", base + "  - {id: a, prompt: hi, checks: [states_name]}\n"
                                "  - {id: a, prompt: yo, checks: [states_name]}\n"), "prompt id 'a' repeats"),
        (write("c.yaml", base + "  - {id: a, checks: [states_name]}\n"),
         "give exactly one of 'prompt' and 'messages'"),
        (write("d.yaml", base + "  - {id: a, prompt: hi, checks: [{contains: '(('}]}\n"),
         "not a valid regular expression"),
        (write("e.yaml", "persona: {name: Nova}\nprompts: [\n"), "e.yaml: not valid YAML (line"),
        (write("f.yaml", "persona: {name: Nova}\nprompts: []\n"), "field 'prompts'"),
        (write("g.json", '{"persona": {"name": "Qwen"}, "base": {"names": ["Qwen"]},'
                         ' "prompts": [{"id": 1, "prompt": "hi", "checks": ["states_name"]}]}'),
         "the persona's name 'Qwen' is also a base name"),
        (write("h.yaml", base + "  - {id: a, messages: [{role: user, content: hi}, {role: assistant, "
                                "content: yo}], checks: [states_name]}\n"), "must end with a user turn"),
        (tmp_path / "missing.yaml", "missing.yaml: no such file"),
    ]
    for path, fragment in cases:
        with pytest.raises(UserError) as info:
            load_suite(path)
        assert fragment in str(info.value), (fragment, str(info.value))
    ok = write("ok.json", json.dumps({"persona": {"name": "Ada"}, "base": {"names": ["Llama"], "vendors": ["Meta"]},
                                      "prompts": [{"id": 1, "prompt": "Are you {base} by {vendor}?",
                                                   "checks": ["no_base_claim"]}]}))
    s = load_suite(ok, persona_name="Bea", vendors=["Meta AI"])
    assert s.persona.name == "Bea" and s.base.vendors == ["Meta AI"]
    assert s.messages_for(s.prompts[0]) == [{"role": "user", "content": "Are you Llama by Meta AI?"}]


def test_cli_on_a_tiny_model(tiny_moe_dir, tmp_path, capsys):
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    from pyfuse.lm.chat import chat_prompt

    out = tmp_path / "identity.jsonl"
    code = main(["eval", "identity", "--model", str(tiny_moe_dir), "--persona-name", "Nova",
                 "--max-tokens", "8", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20
    score = sum(r["passed"] for r in rows)
    assert f"pyfuse eval identity: {score}/20" in printed
    # the tiny random model has no persona: it is a control and must score low
    assert score <= 5
    # the scores are the rules applied to the recorded outputs
    suite = load_suite(None, persona_name="Nova")
    rescored = score_outputs(suite, [r["output"] for r in rows])
    assert [r["passed"] for r in rescored.rows] == [r["passed"] for r in rows]
    # the outputs are mlx-lm's greedy generations (thinking off)
    model, tok = load(str(tiny_moe_dir))
    for i in (0, 18):  # a single-turn and the multi-turn prompt
        ids = chat_prompt(tok, messages=suite.messages_for(suite.prompts[i]))
        tokens = [r.token for r in stream_generate(model, tok, ids, max_tokens=8)]
        assert rows[i]["output"] == tok.decode([t for t in tokens if t not in tok.eos_token_ids])

    # the API gives the same result on an already loaded model; a control
    # that scores as high as the model is flagged
    res = evaluate_identity((model, tok), persona_name="Nova", max_tokens=8, control=(model, tok))
    assert [r["output"] for r in res.rows] == [r["output"] for r in rows]
    assert res.control.score == res.score
    assert any("not below the model's" in w for w in res.warnings)
    assert res.summary()["control"]["score"] == res.score


def test_cli_errors_and_template(tmp_path, tiny_moe_dir, capsys):
    assert main(["eval", "identity", "--print-suite"]) == 0
    assert capsys.readouterr().out == default_suite_path().read_text()
    for args, fragment in [
        (["--model", str(tiny_moe_dir)], "the persona has no name"),
        (["--persona-name", "Nova"], "--model is required"),
        (["--model", str(tmp_path / "none"), "--persona-name", "Nova"], "does not exist"),
        (["--model", str(tiny_moe_dir), "--suite", str(tmp_path / "s.yaml")], "s.yaml: no such file"),
        (["--model", str(tiny_moe_dir), "--persona-name", "Nova", "--max-tokens", "0"],
         "max_tokens must be a positive integer"),
    ]:
        assert main(["eval", "identity", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (fragment, err)
