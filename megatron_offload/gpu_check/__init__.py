"""The GPU check: what runs for real when a GPU is lent (``scripts/gpu_check.sh``).

``check``: the host-link, transfer-backend and offloader checks and the report;
``rows``: end-to-end rows on megatron-core (torch layers, Transformer Engine layers).
Nothing in the product imports this package; it stands on all of it.
"""
