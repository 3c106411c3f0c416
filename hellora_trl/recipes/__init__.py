"""The application layer: recipes built on the core (training scripts, data, offline fixtures, evaluation,
ablations, reports). The core (``hellora_trl.*`` outside ``recipes``, ``cli`` and ``integrations``) never imports it
at module level."""
