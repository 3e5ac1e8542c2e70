"""Data sets: MMLU-Pro items (:mod:`.mmlu`) and Set-G mining (:mod:`.setg`)."""
