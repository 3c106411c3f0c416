"""Application recipes built on the HELLoRA library (SFT job, lab model, corpora)."""
