"""Planning: from a job and its hardware to a plan (pure Python, no torch).

The cost model (``job``, ``costmodel``), the hardware facts (``hardware``), the offload policy
(``policy``), the plan search (``candidates``, ``unit_search``, ``granularity``, ``plan``,
``remedies``, ``reasons``, ``search``) and policy auto (``auto``).
"""
