"""The train-stage options of the persona recipe (pyfuse train's additions
to mlx-lm's settings), the base of :class:`.spec.TrainOptions`. Unset ones
stay out of a step's options, so specs without them keep their hashes."""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from .numbers import yaml_number

__all__ = ["RecipeTrainOptions"]


class RecipeTrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    train_mode: Literal["sft", "dpo", "orpo"] | None = None
    beta: float | None = Field(default=None, gt=0)
    lr_schedule: dict[str, Any] | None = None  # mlx-lm's form: {name, arguments, warmup, warmup_init}
    save_every: typing.Annotated[StrictInt, Field(ge=1)] | None = None
    select_best: StrictBool | None = None
    early_stop_patience: typing.Annotated[StrictInt, Field(ge=0)] | None = None
    requant_policy: Literal["stock", "preserve", "stochastic"] | None = None  # fine_tune_type full, quantized base

    @field_validator("beta", "lr_schedule", mode="before")
    @classmethod
    def _yaml_numbers(cls, v):
        if isinstance(v, dict):  # lr_schedule: its learning rates
            return {k: [yaml_number(a) for a in x] if k == "arguments" and isinstance(x, list) else
                    yaml_number(x) if k == "warmup_init" else x for k, x in v.items()}
        return None if v is None else yaml_number(v)
