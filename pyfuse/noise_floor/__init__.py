"""The re-quantization noise floor (``pyfuse noise-floor``).

``measure`` (orchestration, :func:`~pyfuse.noise_floor.measure.measure_noise_floor`)
-> ``baseline`` (the settings; the quantized model at each, read as
:class:`pyfuse.io.model_dir.ModelDir` reads it) -> ``weights`` (zero-delta
and adapter fuses per policy, through the kernel) -> ``sums`` (per-row
figures) -> ``probe`` (teacher-forced KL / top-1 flips; MC flips through
:mod:`pyfuse.lm.scorer`) -> ``report`` (the result object, Markdown, files)
and ``plots``."""
