"""pyfuse.lm: the compute-dtype policy against mlx-lm's own loading and a
hand-widened model, the chat renderer against the tokenizer's template,
tokenizer errors, and the fixed batch composition. (The scorer and the
generation are checked against direct forward passes and mlx-lm's generate in
test_eval_mc.py; the noise floor's MC answers against eval mc in
test_noise_floor.py.)"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map

from pyfuse.errors import UserError
from pyfuse.lm.chat import chat_prompt, chat_text
from pyfuse.lm.generate import batches, check_positive
from pyfuse.lm.load import load_for_inference, load_model, load_tokenizer, widens

CONVERSATION = [{"role": "user", "content": "What do you like to do on weekends?"},
                {"role": "assistant", "content": "I enjoy hiking and cooking pasta."}]


@pytest.fixture(scope="module")
def bf16_llama(tiny_models_root, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "lm_llama_bf16", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                            quantize={"group_size": 64, "bits": 4}, dtype="bfloat16", num_layers=2)


def _dtypes(model) -> set:
    return {x.dtype for _, x in tree_flatten(model.parameters()) if mx.issubdtype(x.dtype, mx.floating)}


def test_compute_dtype_policy(bf16_llama):
    from mlx_lm import load

    stock, tok = load(str(bf16_llama))  # mlx-lm as it is: bfloat16 parameters
    assert mx.bfloat16 in _dtypes(stock)
    assert _dtypes(load_model(bf16_llama).model) == _dtypes(stock)  # training loads as mlx-lm does
    lm = load_for_inference(bf16_llama)
    ids = mx.array([tok.encode("The capital of France is Paris.")])
    if widens():
        assert _dtypes(lm.model) == {mx.float32}
        # exact for the stored values: every parameter equals mlx-lm's, widened by hand
        widened = dict(tree_flatten(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                                             stock.parameters())))
        for name, x in tree_flatten(lm.model.parameters()):
            assert mx.array_equal(x, widened[name]).item(), name
        stock.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                              stock.parameters()))
    else:  # on the GPU the model runs in its own dtype
        assert _dtypes(lm.model) == _dtypes(stock)
    assert mx.array_equal(lm.model(ids), stock(ids)).item()
    # an already loaded model runs as given: the caller's parameters are not touched
    pair = load(str(bf16_llama))
    assert load_for_inference(pair).model is pair[0]
    assert mx.bfloat16 in _dtypes(pair[0])


def test_chat_renders_whole_conversations(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    text, special = chat_text(tok, messages=CONVERSATION, add_generation_prompt=False)
    assert special is False
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False,
                                           enable_thinking=False)
    assert text.rstrip().endswith("I enjoy hiking and cooking pasta.<|im_end|>")  # no assistant turn opened
    asked, _ = chat_text(tok, messages=CONVERSATION[:1], system_prompt="Be brief.")
    assert asked == tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]],
                                            tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert asked.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat_prompt(tok, "Hi", assistant_prefix="\\boxed{") == tok.encode(
        chat_text(tok, "Hi")[0] + "\\boxed{", add_special_tokens=False)
    with pytest.raises(ValueError, match="exactly one"):
        chat_text(tok, "Hi", messages=CONVERSATION)


def test_chat_without_a_template():
    class Plain:
        has_chat_template = False

    assert chat_text(Plain(), messages=CONVERSATION, system_prompt="S") == (
        "S\n\nWhat do you like to do on weekends?\n\nI enjoy hiking and cooking pasta.\n", True)


def test_load_tokenizer_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_fixed_batches_and_checks():
    assert [list(b) for b in batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [list(b) for b in batches(3, 8)] == [[0, 1, 2]]
    check_positive("limit", None, allow_none=True)
    for bad in (0, -1, True, 1.5, None):
        with pytest.raises(UserError, match="batch_size must be a positive integer"):
            check_positive("batch_size", bad)
