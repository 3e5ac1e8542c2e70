"""The re-quantization noise floor (``pyfuse noise-floor``)."""
