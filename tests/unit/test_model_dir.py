"""pyfuse.io.model_dir.ModelDir against mlx-lm's own loader
(``mlx_lm.utils.load_model`` builds the model graph and gives every quantized
module its bits, group size and mode), ``mx.load`` and the recipe each tiny
model was quantized with."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import pytest

from pyfuse.errors import UserError
from pyfuse.io.model_dir import ModelDir, QParams

THREE_BIT = {"group_size": 64, "bits": 3}
# 6-bit g32 down_proj (64 inputs): its packed shapes also read as 3-bit g64
# with 128 inputs, so only config.json's per-module entry tells them apart.
DOWN_6BIT_G32 = {"down_proj": {"group_size": 32, "bits": 6}}


def mlx_lm_quantization(path) -> dict[str, QParams]:
    """Every quantized module of the model as mlx-lm's loader builds it."""
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path), lazy=True)
    return {name: QParams(m.bits, m.group_size, m.mode)
            for name, m in model.named_modules() if hasattr(m, "scales")}


def thaw(x):
    if isinstance(x, Mapping):
        return {k: thaw(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return [thaw(v) for v in x]
    return x


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir, tiny_moe_dir, tiny_moe_mixed_dir, tiny_llama_dir):
    """name -> (directory, the quantization it was built with)."""
    from pyfuse.demo.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("model_dir")

    def build(name, quantize, **kw):
        return build_tiny_model(root / name, tokenizer_dir=tiny_tokenizer_dir, quantize=quantize, **kw)

    return {
        "3bit": (tiny_moe_dir, THREE_BIT),
        "mixed_6bit_g64": (tiny_moe_mixed_dir, THREE_BIT),
        "llama_4bit": (tiny_llama_dir, {"group_size": 64, "bits": 4}),
        "mixed_6bit_g32": (build("g32", THREE_BIT, arch="qwen3_moe", quant_overrides=DOWN_6BIT_G32),
                           THREE_BIT),
        "sharded": (build("sharded", {"group_size": 32, "bits": 4}, arch="qwen3_moe", shards=3,
                          quant_overrides=DOWN_6BIT_G32), {"group_size": 32, "bits": 4}),
        "mxfp4": (build("mxfp4", {"group_size": 32, "bits": 4, "mode": "mxfp4"}, arch="qwen3_moe"),
                  {"group_size": 32, "bits": 4, "mode": "mxfp4"}),
        "bf16_full_precision": (build("float", None, arch="llama", dtype="bfloat16"), None),
    }


@pytest.mark.parametrize("name", ["3bit", "mixed_6bit_g64", "mixed_6bit_g32", "llama_4bit", "sharded",
                                  "mxfp4", "bf16_full_precision"])
def test_every_module_reads_as_mlx_lm_loads_it(models, name):
    path, recipe = models[name]
    expected = mlx_lm_quantization(path)
    with ModelDir(path) as md:
        assert md.module_quantization() == expected
        assert md.quantization == (None if recipe is None else QParams(**recipe))
        assert md.num_hidden_layers == 4
    if name.startswith("mixed"):  # the mixed models really are mixed
        assert len(set(expected.values())) == 3
    if recipe is None:
        assert expected == {}


@pytest.mark.parametrize("where", ["quantization_config", "text_config.quantization_config"])
def test_quantization_config_spellings(models, tmp_path, where):
    """The quantization stated as an mlx-style ``quantization_config``, at the
    top level or under ``text_config``, reads as the same weights with
    ``quantization`` (mlx-lm 0.32's loader needs the ``quantization`` key for
    mlx-style blocks, so it is the oracle on the original directory)."""
    src, recipe = models["mixed_6bit_g32"]
    path = tmp_path / "variant"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    block = config.pop("quantization")
    config.pop("quantization_config")
    if where == "quantization_config":
        config["quantization_config"] = block
    else:
        config["text_config"] = {"quantization_config": block,
                                 "num_hidden_layers": config.pop("num_hidden_layers")}
    (path / "config.json").write_text(json.dumps(config))
    with ModelDir(path) as md:
        assert md.module_quantization() == mlx_lm_quantization(src)
        assert md.quantization == QParams(**recipe)
        assert thaw(md.declared_quantization) == block
        assert md.num_hidden_layers == 4


def test_sharded_weights_and_index_as_mlx_writes_and_reads_them(models):
    path, _ = models["sharded"]
    shards = sorted(path.glob("model*.safetensors"))
    assert len(shards) == 3
    index = json.loads((path / "model.safetensors.index.json").read_text())
    with ModelDir(path) as md:
        assert md.where == index["weight_map"]
        for shard in shards:
            for name, ref in mx.load(str(shard)).items():
                assert md.where[name] == shard.name
                assert md.tensors[name].shape == tuple(ref.shape)
                got = md.read(name)
                assert got.dtype == ref.dtype and mx.array_equal(got, ref).item(), name


def test_config_is_a_read_only_view_of_config_json(models):
    path, _ = models["mixed_6bit_g64"]
    on_disk = json.loads((path / "config.json").read_text())
    with ModelDir(path) as md:
        assert thaw(md.config) == on_disk
        assert md.config_raw == (path / "config.json").read_bytes()
        assert thaw(md.declared_quantization) == on_disk["quantization"]
        with pytest.raises(TypeError):
            md.config["num_hidden_layers"] = 1
        with pytest.raises(TypeError):
            md.declared_quantization["model.layers.0.mlp.switch_mlp.down_proj"]["bits"] = 3
    assert json.loads((path / "config.json").read_text()) == on_disk


def test_opening_reads_the_headers_only(models, monkeypatch):
    """Validation is cheap: no byte of tensor data is read until asked for."""
    path, _ = models["sharded"]
    reads = []
    real = os.pread

    def spy(fd, n, offset):
        reads.append((fd, n, offset))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", spy)
    with ModelDir(path) as md:
        data_start = {shard.fileno(): shard.data_offset for shard in md.shards.values()}
        assert {fd for fd, _, _ in reads} == set(data_start)
        assert all(offset + n <= data_start[fd] for fd, n, offset in reads)


def _config_case(tmp_path, src, edit) -> Path:
    path = tmp_path / "case"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_bad_directories_are_one_line_errors(models, tmp_path):
    src, _ = models["3bit"]
    with pytest.raises(UserError, match="does not exist"):
        ModelDir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        ModelDir(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        ModelDir(empty)

    def awq(config):
        del config["quantization"]
        config["quantization_config"] = {"quant_method": "awq", "w_bit": 4}

    with pytest.raises(UserError, match="quant_method 'awq' is not an mlx-lm quantization"):
        ModelDir(_config_case(tmp_path / "awq", src, awq))


def test_quantization_without_bits_is_refused_when_asked(models, tmp_path):
    src, _ = models["3bit"]

    def no_bits(config):
        for key in ("quantization", "quantization_config"):
            del config[key]["bits"]

    with ModelDir(_config_case(tmp_path, src, no_bits)) as md:  # opens: the fuse needs no default
        with pytest.raises(UserError, match="quantization must name bits and group_size"):
            md.quantization
