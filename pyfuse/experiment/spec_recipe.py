"""The spec's parts for the persona recipe (the schema is :mod:`.spec`):
the persona check as an evaluation, DPO pairs built from SFT data by a
model of the spec, and applying an adapter to another base.

::

    pairs:                          # DPO pairs (pyfuse.data.pairs, `pyfuse pairs`): a step
      NAME:                         # a train stage's `data: NAME` trains on them
        data: persona               # SFT data (a name from `data`)
        model: base                 # a model, or a condition (its model [+ its unfused adapter])
        max_tokens: 256             # generation budget per rejected reply
        batch_size: 8
        limit: null                 # the first N rows of each file
    conditions:
      NAME:
        stages:
          - apply: {condition: sft}       # the last adapter of condition sft's stages ...
          - apply: {adapter: dir/}        # ... or an adapter directory
          - fuse                          # onto this condition's current model (or evaluate it unfused)
    evaluation:
      persona: {suite: PATH}        # `pyfuse eval persona`'s suite (none: the built-in example)
"""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

PositiveInt = typing.Annotated[StrictInt, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PersonaEval(_Strict):
    """``pyfuse eval persona`` (:mod:`pyfuse.evals.persona`): the suite (None:
    the built-in example, the recipe's three validation prompts)."""

    suite: StrictStr | None = None
    batch_size: PositiveInt = 8


class PairsSource(_Strict):
    """DPO pairs of an SFT data set: its real replies chosen, ``model``'s own
    greedy replies rejected (:func:`pyfuse.data.pairs.make_pairs`)."""

    data: StrictStr
    model: StrictStr
    batch_size: PositiveInt = 8
    max_tokens: PositiveInt = 256
    limit: PositiveInt | None = None


class ApplyOptions(_Strict):
    """An adapter from elsewhere becomes the condition's current adapter:
    the last adapter of another condition's stages, or a directory."""

    condition: StrictStr | None = None
    adapter: StrictStr | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.condition is None) == (self.adapter is None):
            raise ValueError("give exactly one of condition (a condition whose stages end with or fused an "
                             "adapter) or adapter (an adapter directory)")
        return self
