"""The version lifecycle: which versions are served and how they come and go; no gRPC.

`manager.py` (`ModelManager`: verify, load, warm up, swap, drain, lease), `policy.py` (the version policy
and the default route), `admin.py` (`vae-models`, the operator's check / promote / label).
"""
