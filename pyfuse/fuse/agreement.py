"""The fuse report's whole-model figures: the fused model against the base
model with the adapter applied unfused (loaded by mlx-lm's loader,
:func:`pyfuse.lm.load.load_for_inference` with ``adapter_path``), per-token
``KL(unfused || fused)`` of the next-token distributions and top-1 agreement
(:mod:`pyfuse.lm.agreement`), on

* ``agreement_prompts``: every row of mlx-lm data (``text``, ``messages``
  or ``prompt``/``completion``; a ``.jsonl`` file or a data directory), or
* by default with ``calibration``: the calibration sequences the
  calibration holds out (every 4th), which it did not fit on.

The sequences are read and tokenized before the fuse (bad data is refused
before anything is written); the models run after it, one at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..lm.agreement import Agreement, ReferenceLogits, compare_to_reference, reference_logits


@dataclass
class AgreementData:
    """The token sequences the models are compared on, and where they came from."""

    sequences: list[list[int]]
    source: str


def agreement_data(model_path, *, prompts=None, calibration=None, enabled: bool = True) -> AgreementData | None:
    """The sequences to compare on (see the module doc); None when there are none to use."""
    if not enabled or (prompts is None and calibration is None):
        return None
    from ..calibration.collect import HELD_OUT_EVERY, MAX_SEQ_LEN  # cut as the calibration cuts them
    from ..calibration.texts import calibration_sequences, held_out_sequences
    from ..lm.load import load_tokenizer

    data = prompts if prompts is not None else calibration
    flag = "--agreement-prompts" if prompts is not None else "--calibration"
    if not Path(data).exists():
        raise UserError(f"{flag} {data} does not exist")
    tokenizer = load_tokenizer(model_path)
    if prompts is not None:
        return AgreementData(calibration_sequences(tokenizer, prompts, max_seq_len=MAX_SEQ_LEN), str(prompts))
    seqs = held_out_sequences(tokenizer, calibration, every=HELD_OUT_EVERY, max_seq_len=MAX_SEQ_LEN)
    return AgreementData(seqs, f"held-out sequences of {calibration} (every {HELD_OUT_EVERY}th)")


def unfused_reference(model_path, adapter_path, data: AgreementData) -> ReferenceLogits | str:
    """The base model with the adapter applied unfused, its logits on
    ``data``; or, when that model cannot be built, why (a warning: mlx-lm's
    loader refuses e.g. a full fine-tune or what ``--lenient`` fuses)."""
    if not data.sequences:
        return (f"no sequences to compare the fused model with the unfused adapter on ({data.source}): "
                "whole-model KL and top-1 agreement not measured")
    try:
        return reference_logits(model_path, data.sequences, adapter=adapter_path)
    except UserError as err:
        return f"whole-model KL and top-1 agreement not measured: {err}"


def agreement_summary(agreement: Agreement, data: AgreementData) -> dict:
    """The report's summary fields."""
    return {"kl_to_unfused": agreement.kl_mean, "top1_agreement": agreement.top1_agreement,
            "agreement": {**agreement.as_dict(), "data": data.source}}


def measure_fused(model_path, adapter_path, fused: str | os.PathLike, data: AgreementData | None) -> tuple[dict, list]:
    """``(summary fields, warnings)`` of the fused model directory ``fused``."""
    if data is None:
        return {}, []
    ref = unfused_reference(model_path, adapter_path, data)
    if isinstance(ref, str):
        return {"kl_to_unfused": None, "top1_agreement": None}, [ref]
    with ref:
        return agreement_summary(compare_to_reference(ref, fused), data), []


def format_agreement(summary: dict) -> str | None:
    """One line for the terminal, or None when not measured."""
    a = summary.get("agreement")
    if not a:
        return None
    return (f"whole model vs the unfused adapter on {a['tokens']} tokens of {a['sequences']} sequence(s) "
            f"({a['data']}): KL(unfused || fused) {a['kl_mean']:.3g} per token (p99 {a['kl_p99']:.3g}), "
            f"top-1 agreement {a['top1_agreement']:.2%}")
