"""Files in and out: atomic publishing and JSON Lines (:mod:`.files`),
safetensors streaming (:mod:`.safetensors`), the one reader of an mlx-lm
model directory (:mod:`.model_dir`) and of an adapter directory
(:mod:`.adapter_dir`)."""
