"""``pyfuse zero-adapter``: the zero-delta twin of an adapter (the control)."""

from __future__ import annotations

from ._args import add_force, add_model, add_out

HELP = "write the zero-delta twin of an adapter: same structure, every learned delta zero (the control)"
DESCRIPTION = """\
Write the structurally identical adapter with every learned delta zeroed:
the same adapter_config.json, tensor names, shapes and dtypes, with lora_b
all zeros (lora_a kept), so scale * B @ A is exactly 0. Fused through the
same pipeline as the trained adapter, it measures what the fuse and
re-quantization do on their own: the control every LoRA-on-quantized-model
result needs.

DoRA adapters also carry magnitudes (m); their twin sets each magnitude to
the norm of the base weight's row, so the DoRA rescale leaves every row as
it was. That needs the base model (--model).

  pyfuse zero-adapter --adapter-path adapters/factual --out adapters/factual-zero
  pyfuse fuse --model persona --adapter-path adapters/factual-zero --save-path A0 --policy stock"""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"adapter_path": "--adapter-path", "model": "--model"}
OUTPUTS = {"out": "--out"}

def add_arguments(p) -> None:
    p.add_argument("--adapter-path", required=True, help="the trained mlx-lm adapter directory")
    add_out(p, "where to write the zero-delta adapter directory", required=True)
    add_model(p, "the base model the adapter is fused into (required for DoRA adapters)", default=None)
    add_force(p, "--out")


def run(args) -> int:
    from ..adapters.zero import zero_adapter

    res = zero_adapter(args.adapter_path, args.out, model=args.model, force=args.force)
    extra = f", {len(res.magnitudes)} DoRA magnitude(s) set to the base rows' norms" if res.magnitudes else ""
    print(f"pyfuse zero-adapter: wrote {res.out} ({res.fine_tune_type}, lora_b zeroed in "
          f"{len(res.modules)} module(s){extra})")
    return 0
