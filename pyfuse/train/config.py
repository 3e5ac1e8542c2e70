"""``pyfuse train``'s settings: mlx-lm's own keys, from the command line, a
YAML config (``-c/--config``) and mlx-lm's defaults, in that order.

Every key of ``mlx_lm lora``'s ``CONFIG_DEFAULTS`` is accepted with its
meaning (the defaults are read from the installed mlx-lm, so they cannot
drift): a user's mlx-lm YAML runs unchanged. YAML is read with mlx-lm's
loader (``1e-5`` is a float). pyfuse's additions: ``layers`` (explicit
indices instead of "the last ``num_layers``"), ``alpha`` (``scale = alpha /
rank``), ``keys``, ``rank``, ``dropout`` (shortcuts into
``lora_parameters``), ``early_stop_patience``, ``select_best``, ``resume``,
``force``, ``train_mode`` (``sft``, ``dpo``, ``orpo``) with ``beta``
(the names of mlx-lm-lora, the package that adds DPO to mlx-lm), and
``requant_policy`` (``fine_tune_type: full`` on a quantized base: how the
trained weights are re-quantized, :mod:`.full`).

Keys of mlx-lm that pyfuse refuses rather than ignore silently:
``report_to`` (no network), a Hugging Face ``data`` name (local files only).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

# pyfuse's own keys, with their defaults
EXTRA_DEFAULTS = {
    "layers": None,
    "alpha": None,
    "rank": None,
    "dropout": None,
    "keys": None,
    "early_stop_patience": 0,
    "train_mode": "sft",
    "beta": 0.1,
    "select_best": False,
    "resume": False,
    "force": False,
    "quiet": False,
    "requant_policy": "stock",
}
# mlx-lm keys that only mean something to mlx-lm's own command line
_IGNORED = ("train", "config", "project_name", "trust_remote_code")

__all__ = ["EXTRA_DEFAULTS", "mlx_defaults", "read_yaml", "resolve", "train_kwargs"]


def mlx_defaults() -> dict:
    """``mlx_lm lora``'s ``CONFIG_DEFAULTS`` (a deep copy)."""
    import copy

    from mlx_lm.lora import CONFIG_DEFAULTS

    return copy.deepcopy(CONFIG_DEFAULTS)


def read_yaml(path) -> dict:
    """An ``mlx_lm lora`` YAML config, read with mlx-lm's loader."""
    import yaml
    from mlx_lm.lora import yaml_loader

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config {p} does not exist")
    try:
        with open(p, encoding="utf-8") as f:
            data = yaml.load(f, yaml_loader)
    except yaml.YAMLError as err:
        raise UserError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of mlx-lm training keys, got {type(data).__name__}")
    known = set(mlx_defaults()) | set(EXTRA_DEFAULTS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{p}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        "(the keys of mlx_lm lora's CONFIG_DEFAULTS, plus pyfuse's "
                        f"{', '.join(EXTRA_DEFAULTS)})")
    return data


def resolve(cli: dict) -> dict:
    """CLI values (``None`` = not given) over the YAML file's over the
    defaults (mlx-lm's, then pyfuse's)."""
    settings = mlx_defaults()
    settings.update(EXTRA_DEFAULTS, model=None, data=None)  # mlx-lm's are Hugging Face names: no default here
    if cli.get("config"):
        settings.update(read_yaml(cli["config"]))
    settings.update({k: v for k, v in cli.items() if v is not None})
    return settings


def _lora_parameters(s: dict) -> dict:
    lp = dict(s.get("lora_parameters") or {})
    if not isinstance(s.get("lora_parameters") or {}, dict):
        raise UserError("lora_parameters must be a mapping {rank, scale, dropout, keys}")
    for k in ("rank", "dropout", "keys"):
        if s.get(k) is not None:
            lp[k] = s[k]
    lp.setdefault("rank", 8)
    lp.setdefault("dropout", 0.0)
    if s.get("alpha") is not None:
        lp["scale"] = float(s["alpha"]) / lp["rank"]
    lp.setdefault("scale", 20.0)
    return lp


def _check_refused(s: dict) -> None:
    if s.get("report_to"):
        raise UserError(f"report_to {s['report_to']!r}: pyfuse does not report to online services "
                        "(the losses are in loss.json)")
    if s.get("layers") is not None and s.get("num_layers") not in (None, mlx_defaults()["num_layers"]):
        raise UserError("give either layers (explicit indices) or num_layers (the last N layers), not both")


def train_kwargs(s: dict) -> dict:
    """The resolved settings as :func:`pyfuse.train.train_adapter`'s arguments."""
    _check_refused(s)
    lp = _lora_parameters(s)
    layers = s.get("layers")
    if layers is None:
        layers = _last_layers(s["num_layers"])
    out = {k: s[k] for k in ("fine_tune_type", "optimizer", "optimizer_config", "seed", "batch_size", "iters",
                             "val_batches", "learning_rate", "steps_per_report", "steps_per_eval",
                             "resume_adapter_file", "save_every", "test", "test_batches", "max_seq_length",
                             "grad_checkpoint", "grad_accumulation_steps", "clear_cache_threshold",
                             "lr_schedule", "mask_prompt", "early_stop_patience", "select_best", "resume",
                             "force", "train_mode", "beta", "requant_policy")}
    out.update(rank=lp["rank"], scale=lp["scale"], dropout=lp["dropout"], keys=lp.get("keys"), layers=layers,
               verbose=not s.get("quiet"))
    return out


def _last_layers(num_layers) -> str | None:
    """mlx-lm's ``num_layers`` (the last N; -1 all) as a layer selection."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers == 0 or num_layers < -1:
        raise UserError(f"num_layers must be a positive integer or -1 (all layers), got {num_layers!r}")
    return None if num_layers == -1 else f"last:{num_layers}"
